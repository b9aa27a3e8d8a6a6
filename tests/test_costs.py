"""The shared cost formulas against hand calculations."""

import math

import pytest

from hetalloc.catalog import DEVICE_TYPES
from hetalloc.costs import (hierarchical_allreduce_time, in_flight_microbatches, max_share_for_memory,
                            optimizer_time, p2p_time, param_bytes, param_server_time, ring_allreduce_time,
                            stage_memory, usable_memory)


def test_p2p():
    # 10 MB over 10 GB/s with 5 us latency
    assert p2p_time(10e6, 10e9, 5e-6) == pytest.approx(1e-3 + 5e-6)
    assert p2p_time(0, 10e9, 5e-6) == 0.0


def test_ring_allreduce_hand_calc():
    # 4 devices, 1 GB, 100 GB/s, 10 us: 2*3/4 * 1e9/1e11 + 2*3*1e-5 = 0.015 + 0.00006
    assert ring_allreduce_time(1e9, 4, 100e9, 10e-6) == pytest.approx(0.01506)
    assert ring_allreduce_time(1e9, 1, 100e9, 10e-6) == 0.0


def test_hierarchical_allreduce_hand_calc():
    # 2 nodes x 4 GPUs, 1 GB; intra 100 GB/s 2 us; inter 10 GB/s 10 us
    intra = 2 * 3 / 4 * 1e9 / 100e9 + 2 * 3 * 2e-6
    inter = 2 * 1 / 2 * 1e9 / 10e9 + 2 * 1 * 10e-6
    assert hierarchical_allreduce_time(1e9, [4, 4], 100e9, 2e-6, 10e9, 10e-6) == pytest.approx(intra + inter)
    # one node: only the intra-node part
    assert hierarchical_allreduce_time(1e9, [4], 100e9, 2e-6, 10e9, 10e-6) == pytest.approx(intra)


def test_param_server_hand_calc():
    # 2 nodes x 2 workers, 1 GB: shard 0.25 GB; each worker sends 1 shard on-node, 2 off-node;
    # off-node traffic shares the NIC between the node's 2 workers.
    on = 0.25e9 / 100e9
    off = 0.5e9 * 2 / 10e9
    expect = 2 * (10e-6 + max(on, off))
    assert param_server_time(1e9, [2, 2], 100e9, 2e-6, 10e9, 10e-6) == pytest.approx(expect)


def test_param_bytes():
    assert param_bytes("bf16-mixed", "adamw").total == 16  # ZeRO paper: 2 + 2 + 12
    assert param_bytes("fp32", "adamw").total == 16
    assert param_bytes("fp32", "sgd").total == 12


def test_stage_memory_and_inflight():
    m = stage_memory(params=1_000_000, saved_act_bytes_per_sample=1000.0, out_act_bytes_per_sample=100.0,
                     share=4, in_flight=3, precision="bf16-mixed", optimizer="adamw")
    assert m.weights == 2e6 and m.grads == 2e6 and m.optimizer == 12e6
    assert m.activations == 1000 * 4 * 3
    assert m.buffers == 2 * 100 * 4
    assert m.total == 16e6 + 12000 + 800
    assert in_flight_microbatches("gpipe", 0, 4, 8) == 8
    assert [in_flight_microbatches("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", 0, 4, 2) == 2


def test_max_share_for_memory():
    t4 = DEVICE_TYPES["T4"]
    cap = usable_memory(t4)
    params = int(cap / 16 / 2)  # weights + grads + state use half the memory
    k = max_share_for_memory(params, 1e8, 0.0, 2, "bf16-mixed", "adamw", t4)
    assert k == math.floor((cap - params * 16) / (2e8))
    assert max_share_for_memory(int(cap / 8), 1.0, 0.0, 1, "bf16-mixed", "adamw", t4) == -1


def test_optimizer_time():
    a100 = DEVICE_TYPES["A100-80G"]
    # read + write 16 bytes per parameter at 2039 GB/s
    assert optimizer_time(1_000_000, a100, "bf16-mixed", "adamw") == pytest.approx(2 * 16e6 / 2039e9)
