"""Predictions of schema-2 plans (tensor-parallel groups, recomputation, zero1) on toy
clusters, worked out by hand in the comments; and schema-1 plans predict as before."""

from __future__ import annotations

import pytest

from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.evaluate import predict, rank_pairs, sync_groups
from hetalloc.models import LayerShape
from hetalloc.plan import Group, Plan, Replica, Stage, device_memory
from test_sim_timeline import toy_cluster


def tp_graph(num_layers: int = 2, params: int = 0) -> CostGraph:
    """fp32 blocks: 1 s forward, 2 s backward per sample on X; 0.5 GB out per sample; TP:
    2 + 2 all-reduces of 0.25 GB per sample, 20 % of the 1 MB of saved activations and
    no parameters replicated, 0.5 MB kept under recomputation; 100 % TP efficiency."""
    layers = [LayerShape(f"l{i}", "block", params, 1.0, 0.5e9, 1e6, replicated_params=0, replicated_act_bytes=0.2e6,
                         checkpoint_bytes=0.5e6, tp_allreduces_fwd=2, tp_allreduces_bwd=2, tp_allreduce_bytes=0.25e9)
              for i in range(num_layers)]
    table = TimeTable([1], [[1.0]] * num_layers, [[2.0]] * num_layers)
    return CostGraph("toy", 1, "fp32", layers, tables={"X": table}, tp_efficiency={"X": {2: 1.0, 4: 1.0}})


def plan_of(stages_per_replica, M=1, schedule="gpipe", sharding="none") -> Plan:
    reps = [Replica([Stage(a, b, [Group(list(d), s) for d, s in groups], rc) for a, b, groups, rc in r])
            for r in stages_per_replica]
    B = M * sum(r.microbatch for r in reps)
    return Plan("toy", 1, B, M, schedule, "ring", reps, precision="fp32", optimizer_sharding=sharding)


def test_rank_pairs():
    assert rank_pairs(["a"], ["b"]) == [("a", "b")]
    assert rank_pairs(["a0", "a1"], ["b0", "b1", "b2", "b3"]) == [("a0", "b0"), ("a1", "b1"), ("a0", "b2"),
                                                                   ("a1", "b3")]
    assert rank_pairs(["a0", "a1", "a2", "a3"], ["b0", "b1"]) == [("a0", "b0"), ("a1", "b1")]


def test_tp_group_feeding_one_device_hand_timeline():
    # Stage 0: layer 0 on the 2-way group (n/0, n/1); stage 1: layer 1 on n/2; one sample.
    # Group: compute 1/2 = 0.5 s forward, 2/2 = 1 s backward; TP all-reduces 2 x 0.25 GB
    # per op, ring over 2 at 1 GB/s: 2(1/2) * 0.5 GB / 1 GB/s = 0.5 s per op. Sends: n/0
    # sends 0.5 GB to n/2 (0.5 s); backward n/2 sends 0.5 GB to each rank, 1 s in all.
    # F0 [0, 1.5], F1 [1.5, 2.5], B1 [2.5, 5.5], B0 [5.5, 7.0]; no gradients to sync.
    cl, cg = toy_cluster({"n": 4}), tp_graph()
    plan = plan_of([[(0, 1, [(("n/0", "n/1"), 1)], "none"), (1, 2, [(("n/2",), 1)], "none")]])
    p = predict(plan, cl, cg)
    assert p.iteration_time_s == pytest.approx(7.0)
    st0 = p.stages[0]
    assert (st0["fwd_s"], st0["bwd_s"], st0["tp_s"], st0["p2p_s"]) == pytest.approx((0.5, 1.0, 1.0, 0.5))
    assert p.stages[1]["p2p_s"] == pytest.approx(1.0)
    # Busy: group 2 devices x (0.5 + 1 + 0.5 + 0.5) + n/2 x 3 = 8 of 3 devices x 7 s.
    assert p.bubble_fraction == pytest.approx(1 - 8 / 21)
    # Full recomputation on stage 0: backward compute 1 + 0.5, and its two forward
    # all-reduces again: 4 x 0.25 GB -> 1 s. B0 [5.5, 8.0].
    plan.replicas[0].stages[0].recompute = "full"
    assert predict(plan, cl, cg).iteration_time_s == pytest.approx(8.0)


def test_memory_with_tp_and_recompute():
    cl, cg = toy_cluster({"n": 4}), tp_graph()
    plan = plan_of([[(0, 1, [(("n/0", "n/1"), 1)], "none"), (1, 2, [(("n/2",), 1)], "full")]], M=1)
    mem = device_memory(plan, cl, cg)
    # t = 2: (1 MB - 0.2 MB) / 2 + 0.2 MB = 0.6 MB per sample; send/recv buffers 2 x 0.5 GB
    assert mem["n/0"].activations == pytest.approx(0.6e6) and mem["n/1"].total == mem["n/0"].total
    assert mem["n/0"].buffers == pytest.approx(1e9)
    # recompute: keeps 0.5 MB, rebuilds one layer (1 MB at t = 1) in the backward
    assert mem["n/2"].activations == pytest.approx(0.5e6 + 1e6)


def test_zero1_and_slices_of_differently_sized_groups():
    cl, cg = toy_cluster({"n": 4}, mem_gbps=32.0), tp_graph(params=10**6)
    # Two replicas of one stage (2 layers, 2e6 fp32 parameters): a 2-way group and one device.
    plan = plan_of([[(0, 2, [(("n/0", "n/1"), 1)], "none")], [(0, 2, [(("n/2",), 1)], "none")]])
    gs = sync_groups(plan, cl, cg)
    # t_max = 2: slice 0 is reduced by n/0 and n/2, slice 1 by n/1 and n/2; 1e6 params x 4 B
    assert [(g.devices, g.nbytes, g.slice, g.slices) for g in gs] == [(["n/0", "n/2"], 4e6, 0, 2),
                                                                      (["n/1", "n/2"], 4e6, 1, 2)]
    assert gs[0].time_s == pytest.approx(4e6 / 1e9)  # ring over 2: 2(1/2) bytes / bw
    mem = device_memory(plan, cl, cg)
    assert mem["n/0"].weights == 4e6 and mem["n/2"].weights == 8e6 and mem["n/0"].optimizer == 8e6
    p = predict(plan, cl, cg)
    # n/2: two slices (8 ms) + an AdamW step over 2e6 params x 16 B read+written at 32 GB/s (2 ms),
    # then the loss all-reduce among the 3 devices (2 rounds of 8 bytes at 1 GB/s: 16 ns)
    assert p.loss_reduction_time_s == pytest.approx(2 * 8e-9)
    assert p.iteration_time_s - p.pipeline_time_s - p.loss_reduction_time_s == pytest.approx(8e-3 + 2e-3)
    # zero1: each device keeps half of the state of what it holds, and steps half of it
    plan.optimizer_sharding = "zero1"
    mem = device_memory(plan, cl, cg)
    assert mem["n/0"].optimizer == 4e6 and mem["n/2"].optimizer == 8e6 and mem["n/2"].weights == 8e6
    z = predict(plan, cl, cg)
    assert z.iteration_time_s - z.pipeline_time_s - z.loss_reduction_time_s == pytest.approx(8e-3 + 1e-3)
