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


# ---- plan space v2: tensor parallelism, recomputation, zero1 -----------------------------
# Hand checks on GPT-3 175B (h = 12288, a = 96, s = 2048, 96 blocks, bf16) on A100-80G
# nodes with NVLink3 (300 GB/s, 3 us), micro-batch b = 1, against Megatron's published
# formulas: Korthikanti et al. 2022 eqs. 1-2 (activations per layer), Narayanan et al.
# 2021 section 3.2 (8bsh(t-1)/t elements of TP all-reduce traffic per layer and device),
# ZeRO's 16 bytes per parameter.

from hetalloc.catalog import DEFAULT_TP_EFFICIENCY  # noqa: E402
from hetalloc.costgraph import analytic_cost_graph, cost_graph_from_dict  # noqa: E402
from hetalloc.costs import (layer_saved_bytes, recompute_backward_time, tp_comm_time, tp_layer_time,  # noqa: E402
                            tp_share, zero1_halves, zero1_params)
from hetalloc.models import get_model  # noqa: E402

S, H, A = 2048, 12288, 96
SBH = S * H  # b = 1
A100 = DEVICE_TYPES["A100-80G"]


@pytest.fixture(scope="module")
def gpt3():
    return analytic_cost_graph(get_model("gpt3-175b"))


def test_tp_share_and_layer_time_hand_calc():
    assert tp_share(100.0, 4.0, 1) == 100.0
    assert tp_share(100.0, 4.0, 8) == 96 / 8 + 4
    # 10 ms on one device, 4-way at 90 %, 20 us of launches that do not shrink
    assert tp_layer_time(10e-3, 4, 0.9, 20e-6) == pytest.approx(20e-6 + 9.98e-3 / 3.6)
    assert tp_layer_time(10e-3, 1, 0.5, 20e-6) == 10e-3
    assert recompute_backward_time(1.0, 2.0) == 3.0


def test_gpt3_activation_memory_korthikanti(gpt3):
    block = gpt3.layers[1]
    # eq. 1: sbh(34 + 5as/h) bytes per layer = 114 sbh here (5 * 96 * 2048 / 12288 = 80)
    assert block.saved_act_bytes == SBH * 114 == 2_868_903_936
    # eq. 2 with t = 8: sbh(10 + 24/8 + 80/8) = 23 sbh
    assert gpt3.range_saved_bytes(1, 2, tp=8) == pytest.approx(SBH * 23) and SBH * 23 == 578_813_952
    assert gpt3.range_saved_bytes(1, 2, tp=2) == pytest.approx(SBH * (10 + 12 + 40))
    # full recomputation keeps the block input, 2sbh (not split without sequence parallelism)
    assert gpt3.range_saved_bytes(1, 2, tp=8, recompute="full") == 2 * SBH
    assert layer_saved_bytes(100.0, 10.0, 7.0, 2, "full") == 7.0
    assert layer_saved_bytes(100.0, 10.0, 0.0, 2, "full") == 55.0  # not recomputed (embedding, head)
    # ... and rebuilds one block at a time in the backward
    assert gpt3.range_working_bytes(1, 9, tp=8, recompute="full") == pytest.approx(SBH * 23)
    assert gpt3.range_working_bytes(1, 9, tp=8) == 0.0
    # 8 blocks, 1F1B first of 12 stages: 12 micro-batches in flight of 2sbh each + the working set
    m = stage_memory(gpt3.range_params(1, 9, 8), gpt3.range_saved_bytes(1, 9, 8, "full"), 2 * SBH, 1, 12,
                     "bf16-mixed", "adamw", working_act_bytes_per_sample=gpt3.range_working_bytes(1, 9, 8, "full"))
    assert m.activations == pytest.approx(8 * 2 * SBH * 12 + 23 * SBH)


def test_gpt3_parameter_memory_with_tp_and_zero1(gpt3):
    block = gpt3.layers[1]
    assert block.params == 12 * H**2 + 13 * H == 1_812_099_072
    # split: QKV, projection and both MLP matmuls with their column biases (12h^2 + 7h);
    # whole on every rank: 2 layer norms (4h) and the two row-parallel output biases (2h)
    assert block.replicated_params == 6 * H
    per_rank = (12 * H**2 + 7 * H) / 8 + 6 * H
    assert gpt3.range_params(1, 2, tp=8) == per_rank == 226_576_896
    m = stage_memory(per_rank, 0.0, 0.0, 1, 1, "bf16-mixed", "adamw")
    assert m.weights + m.grads + m.optimizer == 16 * per_rank  # 2 + 2 + 12 bytes per parameter
    # zero1 over 4 data-parallel copies: the 12 bytes of optimizer state per parameter / 4
    z = stage_memory(per_rank, 0.0, 0.0, 1, 1, "bf16-mixed", "adamw", optimizer_params=zero1_params(per_rank, 4))
    assert z.optimizer == 3 * per_rank and z.weights == m.weights and z.grads == m.grads
    assert optimizer_time(zero1_params(per_rank, 4), A100, "bf16-mixed", "adamw") == pytest.approx(
        2 * 16 * per_rank / 4 / 2039e9)
    # the whole model (~175 G parameters, 2.8 TB of state) does not fit one 8xA100-80G node
    # even 8-way: ~350 GB per GPU; 12 stages of 8 blocks do (29 GB of state per GPU)
    whole = gpt3.range_params(0, gpt3.num_layers, tp=8)
    assert gpt3.total_params == pytest.approx(175.2e9, rel=0.005)
    assert 16 * whole == pytest.approx(16 * 175.2e9 / 8, rel=0.01)
    assert max_share_for_memory(whole, 0.0, 0.0, 1, "bf16-mixed", "adamw", A100) == -1
    assert 16 * gpt3.range_params(1, 9, tp=8) == pytest.approx(29.0e9, rel=0.01)
    assert max_share_for_memory(gpt3.range_params(1, 9, 8), gpt3.range_saved_bytes(1, 9, 8, "full"), 2 * SBH, 12,
                                "bf16-mixed", "adamw", A100,
                                working_act_bytes_per_sample=gpt3.range_working_bytes(1, 9, 8, "full")) >= 1


def test_gpt3_tp_allreduce_bytes_and_time(gpt3):
    # a block all-reduces b*s*h bf16 activations twice forward, twice backward
    assert gpt3.tp_allreduces(1, 2) == (2, 2 * 2 * SBH, 2, 2 * 2 * SBH)
    # recomputation repeats the forward's two in the backward
    assert gpt3.tp_allreduces(1, 2, "full") == (2, 4 * SBH, 4, 8 * SBH)
    # vocabulary-parallel embedding: 1 in the forward; LM head: 1 in the backward
    assert gpt3.tp_allreduces(0, 1) == (1, 2 * SBH, 0, 0.0)
    assert gpt3.tp_allreduces(97, 98) == (0, 0.0, 1, 2 * SBH)
    # one all-reduce of 50.3 MB over 8 GPUs on NVLink3: 2*7/8 * 50331648 / 300e9 + 14 * 3 us
    one = 2 * 7 / 8 * 50_331_648 / 300e9 + 14 * 3e-6
    assert one == pytest.approx(335.6e-6, rel=1e-4)
    assert tp_comm_time(1, 2 * SBH, 8, 300e9, 3e-6) == pytest.approx(one)
    assert tp_comm_time(2, 4 * SBH, 8, 300e9, 3e-6) == pytest.approx(2 * ring_allreduce_time(2 * SBH, 8, 300e9, 3e-6))
    # Narayanan et al.: per layer and micro-batch each device moves 8bsh(t-1)/t elements
    # (2 bytes each): with 1 byte/s and no latency the time is the byte count
    assert tp_comm_time(4, 4 * 2 * SBH, 8, 1.0, 0.0) == pytest.approx(8 * SBH * 7 / 8 * 2)
    assert tp_comm_time(2, 4 * SBH, 1, 300e9, 3e-6) == 0.0


def test_gpt3_tp_compute_and_recompute_time(gpt3):
    f1, b1 = gpt3.layer_times(A100, 1)
    f8, b8 = gpt3.layer_times(A100, 1, tp=8)
    e = DEFAULT_TP_EFFICIENCY[8]
    launch = gpt3.eff(A100, "block").overhead_s
    assert f8[1] == pytest.approx(launch + (f1[1] - launch) / (8 * e))
    assert b8[1] == pytest.approx(launch + (b1[1] - launch) / (8 * e))
    fwd, bwd = gpt3.range_time(1, 9, A100, 1, tp=8, recompute="full")
    assert fwd == pytest.approx(8 * f8[1])
    assert bwd == pytest.approx(8 * (f8[1] + b8[1]))  # one more forward inside the backward
    # embedding and head are not recomputed
    assert gpt3.range_time(0, 1, A100, 1, recompute="full") == gpt3.range_time(0, 1, A100, 1)
    # t = 1 / none / none is today's formula, exactly
    assert gpt3.range_time(0, 98, A100, 3, tp=1, recompute="none") == gpt3.range_time(0, 98, A100, 3)
    # an efficiency from the cost graph overrides the catalog's, by type, then '*'
    ov = gpt3.with_tp_efficiency({"*": {8: 0.5}, "A100-80G": {4: 1.0}})
    assert ov.layer_times(A100, 1, tp=8)[0][1] == pytest.approx(launch + (f1[1] - launch) / 4)
    assert ov.layer_times(A100, 1, tp=4)[0][1] == pytest.approx(launch + (f1[1] - launch) / 4)
    back = cost_graph_from_dict(ov.to_dict())
    assert back.tp_efficiency == {"*": {8: 0.5}, "A100-80G": {4: 1.0}} and back.fingerprint() == ov.fingerprint()


def test_zero1_halves_and_fingerprint_of_old_graphs(gpt3):
    assert zero1_halves(0.3) == (0.15, 0.15)
    rs, _ = zero1_halves(ring_allreduce_time(1e9, 4, 100e9, 10e-6))
    assert rs == pytest.approx(3 / 4 * 1e9 / 100e9 + 3 * 10e-6)  # (n-1)/n bytes/bw + (n-1) lat
    # a cost graph written before the TP fields loads, says so, and keeps its fingerprint
    d = gpt3.to_dict()
    old_layers = [{k: l[k] for k in ("name", "kind", "params", "fwd_flops", "out_act_bytes", "saved_act_bytes")}
                  for l in d["layers"]]
    old = cost_graph_from_dict({**d, "layers": old_layers})
    assert not old.supports_tp and gpt3.supports_tp
    assert old.to_dict()["layers"] == old_layers


# The new families' tensor-parallel split, by hand (parameter totals as published).

def test_qwen2_tp_split_keeps_norms_whole_and_splits_qkv_biases():
    from hetalloc.models import shape_from_hf_config
    # Qwen2-7B: h = 3584, 28 heads of 128, 4 KV heads (GQA), f = 18944, V = 152064, q/k/v biases
    qwen = shape_from_hf_config({"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
                                 "num_key_value_heads": 4, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "vocab_size": 152064, "max_position_embeddings": 32768}, "qwen2-7b")
    cg = analytic_cost_graph(qwen, 4096)
    h, kv = 3584, 4 * 128
    block = cg.layers[1]
    # q, o: 2h^2; k, v: 2h*kv; SwiGLU 3hf; q/k/v biases h + 2kv; two RMSNorms 2h
    assert block.params == 2 * h * h + 2 * h * kv + 3 * h * 18944 + h + 2 * kv + 2 * h == 233_057_792
    assert cg.total_params == 7_615_616_512  # Qwen2-7B's published count (untied head)
    # whole on every rank: the two RMSNorms only (the q/k/v biases split with their heads)
    assert block.replicated_params == 2 * h
    assert cg.range_params(1, 2, tp=4) == (233_057_792 - 2 * h) / 4 + 2 * h == 58_269_824
    # embedding split along the vocabulary, nothing whole; the head keeps its RMSNorm whole
    assert (cg.layers[0].replicated_params, cg.layers[-1].replicated_params) == (0, h)
    assert cg.tp_allreduces(0, 2) == (3, 3 * 4096 * h * 2, 2, 2 * 4096 * h * 2)  # embedding, one block
    # Llama with attention_bias and mlp_bias: o_proj's and down_proj's biases are whole too
    biased = shape_from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "intermediate_size": 172, "num_hidden_layers": 1,
                                   "vocab_size": 256, "attention_bias": True, "mlp_bias": True})
    assert analytic_cost_graph(biased).layers[1].replicated_params == 2 * 64 + 64 + 64


def test_opt_tp_split_keeps_positions_and_projections_whole():
    from hetalloc.models import shape_from_hf_config
    # OPT-350m: h = 1024, word width w = 512 (project_in / project_out), post-LN (no final
    # norm), f = 4096, V = 50272, 2048 positions (+ 2 offset rows)
    opt = shape_from_hf_config({"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512,
                                "ffn_dim": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                                "vocab_size": 50272, "max_position_embeddings": 2048,
                                "do_layer_norm_before": False}, "opt-350m")
    cg = analytic_cost_graph(opt, 2048)
    h, w, V, s = 1024, 512, 50272, 2048
    emb, block, head = cg.layers[0], cg.layers[1], cg.layers[-1]
    # 331,196,416 published with the head tied to the embedding; untied it adds w*V
    assert cg.total_params == 331_196_416 + w * V
    assert emb.params == V * w + 2050 * h + w * h and emb.replicated_params == 2050 * h + w * h == 2_623_488
    assert block.replicated_params == 4 * h + 2 * h  # 2 layer norms, out_proj and fc2 biases
    assert head.params == w * h + w * V and head.replicated_params == w * h  # project_out whole
    assert cg.range_params(0, 1, tp=2) == V * w / 2 + 2_623_488
    # the embedding and LM head all-reduce w-wide activations (bf16), the blocks h-wide
    assert cg.tp_allreduces(0, 1) == (1, s * w * 2, 0, 0.0)
    assert cg.tp_allreduces(1, 2) == (2, 2 * s * h * 2, 2, 2 * s * h * 2)
    assert cg.tp_allreduces(25, 26) == (0, 0.0, 1, s * w * 2)


def test_quantile_value_hand_calc():
    from hetalloc.costs import quantile_value
    q = (-0.1, 0.0, 0.3)  # levels 0, 1/2, 1
    assert quantile_value(q, 0.0) == -0.1
    assert quantile_value(q, 0.25) == pytest.approx(-0.05)  # halfway between levels 0 and 1/2
    assert quantile_value(q, 0.5) == 0.0
    assert quantile_value(q, 0.9) == pytest.approx(0.24)  # 0 + 0.8 x 0.3
    assert quantile_value(q, 1.0) == pytest.approx(0.3)
    assert quantile_value((1.0, 2.0), 0.999) == pytest.approx(1.999)
    with pytest.raises(ValueError):
        quantile_value((1.0,), 0.5)
