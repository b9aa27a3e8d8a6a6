"""Fast, single-process checks of the runtime's parts: rank mapping and launch checks,
activation routing between stages of different widths, the global batch layout, the
model cut, data, configuration, commands, and a one-device training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.errors import SpecError
from hetalloc.models import get_model, resolve_model
from runtime import commands
from runtime.checkpoint import plan_key
from runtime.config import TrainConfig, parse_slowdown
from runtime.datasets import TokenDataset, device_samples
from runtime.launch import node_commands, train_args
from runtime.metrics import predicted_by_device
from runtime.models import StageModule, build_model, layer_param_counts
from runtime.pipeline import stage_role
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.rankmap import check_launch, check_supported, rank_map

ROOT = Path(__file__).resolve().parents[1]
TWO_HOSTS = {"name": "two-hosts", "nodes": [
    {"name": "a", "gpus": [{"type": "CPU", "count": 2}], "intra_link": "SharedMem", "nic": "Eth-100G"},
    {"name": "b", "gpus": [{"type": "CPU", "count": 2}], "intra_link": "SharedMem", "nic": "Eth-100G"}]}


def cpu4():
    return load_cluster(ROOT / "examples" / "cpu-4.yaml")


def two_node_plan():
    cluster = cluster_from_dict(TWO_HOSTS)
    # Devices listed out of cluster order; a/0 unused.
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 3), [("b/1", 2)]), ((3, 6), [("a/1", 1), ("b/0", 1)])]], num_microbatches=2)
    return cluster, plan


def env(world, rank, local_rank, local_world, group_rank):
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(group_rank)}


# ---- rank <-> device ------------------------------------------------------------------

def test_ranks_are_plan_devices_in_cluster_order_grouped_by_node():
    cluster, plan = two_node_plan()
    rm = rank_map(plan, cluster)
    assert rm.devices == ("a/1", "b/0", "b/1")
    assert rm.nodes == ("a", "b")
    assert rm.ranks_on("b") == [1, 2] and rm.local_rank(2) == 1


def test_groups_of_different_sizes_with_sharded_optimizer_state_are_refused_in_one_line(tmp_path):
    from runtime.launch import load_checked
    cluster = cpu4()
    cg = cpu_cost_graph(str(ROOT / "examples" / "llama-tiny.json"), 16)
    # tensor parallelism, recomputation and zero1 run, and groups of different sizes with ring sync ...
    check_supported(hand_plan(cluster, cg, [[((0, 3), [(("host/0", "host/1"), 2)], "full"), ((3, 6), [("host/2", 2)])]],
                              num_microbatches=2, optimizer_sharding="zero1"))
    check_supported(hand_plan(cluster, cg, [[((0, 6), [(("host/0", "host/1"), 2), ("host/2", 1)])]],
                              num_microbatches=2))
    # ... but not groups of different sizes whose optimizer steps flat shards (zero1, parameter server)
    mixed = hand_plan(cluster, cg, [[((0, 6), [(("host/0", "host/1"), 2), ("host/2", 1)])]], num_microbatches=2,
                      optimizer_sharding="zero1")
    mixed.save(tmp_path / "mixed.json")
    with pytest.raises(SpecError, match=r"mixed.json: replicas: layers 0-5 are held by tensor-parallel groups of "
                                        r"sizes 1, 2: the runtime shards their optimizer state \(zero1\) only "
                                        "between groups of one size") as e:
        load_checked(tmp_path / "mixed.json")
    assert "\n" not in str(e.value)


def test_check_launch_accepts_the_plans_layout():
    cluster, plan = two_node_plan()
    info = check_launch(rank_map(plan, cluster), env(3, 2, 1, 2, 1), node="b")
    assert (info.rank, info.device, info.node) == (2, "b/1", "b")


@pytest.mark.parametrize("environ, node, message", [
    (env(4, 0, 0, 4, 0), None, "torchrun: WORLD_SIZE: is 4 but the plan uses 3 devices — launch 2 nodes with "
                               "these process counts (a: 1, b: 2)"),
    (env(3, 0, 0, 2, 0), None, "torchrun: --nproc-per-node: node 'a' runs 2 processes but the plan uses 1 of its "
                               "devices — use --nproc-per-node=1 on this node"),
    (env(3, 0, 0, 1, 0), "b", "torchrun: --node-rank: node rank 0 is plan node 'a', but this is node 'b' — start "
                              "node 'b' with --node-rank=1"),
    (env(3, 0, 0, 1, 2), None, "torchrun: GROUP_RANK: is 2 but the plan uses 2 nodes — use --node-rank between 0 "
                               "and 1"),
    (env(3, 0, 0, 1, 0), "c", "--plan-node: 'c' is not a node this plan uses — use one of a, b"),
])
def test_check_launch_rejects_mismatches_in_one_line(environ, node, message):
    cluster, plan = two_node_plan()
    with pytest.raises(SpecError) as e:
        check_launch(rank_map(plan, cluster), environ, node=node)
    assert str(e.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_gpu_plan_on_a_machine_without_cuda_fails_before_training(monkeypatch):
    from runtime.train import setup
    cluster = cluster_from_dict({"name": "gpus", "nodes": [{"gpus": [{"type": "A100-80G", "count": 2}],
                                                             "intra_link": "NVLink3"}]})
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32), [[((0, 6), [("node0/0", 1), ("node0/1", 1)])]],
                     num_microbatches=1)
    for k, v in env(2, 0, 0, 2, 0).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SpecError, match="is a A100-80G but torch sees 0 CUDA devices on this node"):
        setup(plan, cluster)
    assert not dist.is_initialized()


# ---- routing and data layout ----------------------------------------------------------

def test_stage_roles_route_overlapping_slices_between_widths():
    cluster = cpu4()
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 2), [("host/0", 2), ("host/1", 1)]), ((2, 6), [("host/2", 1), ("host/3", 2)])]],
                     num_microbatches=2)
    rm = rank_map(plan, cluster)
    r0, r1, r2, r3 = (stage_role(plan, rm, r) for r in range(4))
    # senders' slices [0,2) [2,3) against receivers' [0,1) [1,3)
    assert r0.send_to == (((2,), 1), ((3,), 1)) and r1.send_to == (((3,), 1),)
    assert r2.recv_from == ((0, 1),) and r3.recv_from == ((0, 1), (1, 1))
    # backward: the same pieces the other way
    assert r0.grad_from == ((2, 1), (3, 1)) and r3.grad_to == (((0,), 1), ((1,), 1))
    assert r0.is_first and not r0.is_last and r3.is_last and r3.recv_from and not r3.send_to
    assert r0.tp_size == 1 and r0.tp_rank == 0


def test_stage_roles_between_tensor_parallel_groups_follow_rank_pairs():
    """Rank k of a receiving group gets the whole piece from rank k mod t of the sending
    group (hetalloc.evaluate.rank_pairs), forward and backward."""
    cluster = cpu4()
    # a group of 2 (shares 2) feeding a group of one: only its rank 0 sends
    plan = hand_plan(cluster, cpu_cost_graph(str(ROOT / "examples" / "llama-tiny.json"), 16),
                     [[((0, 3), [(("host/0", "host/1"), 2)]), ((3, 6), [("host/2", 2)])]], num_microbatches=2)
    rm = rank_map(plan, cluster)
    r0, r1, r2 = (stage_role(plan, rm, r) for r in range(3))
    assert (r0.tp_rank, r1.tp_rank, r0.tp_ranks, r2.tp_ranks) == (0, 1, (0, 1), ())
    assert r0.send_to == (((2,), 2),) and r1.send_to == (((), 2),)
    assert r0.grad_from == ((2, 2),) and r1.grad_from == ((2, 2),)  # both need the output gradient
    assert r2.recv_from == ((0, 2),) and r2.grad_to == (((0, 1), 2),)
    # a group of one feeding a group of 2: it sends each rank the whole piece
    plan = hand_plan(cluster, cpu_cost_graph(str(ROOT / "examples" / "llama-tiny.json"), 16),
                     [[((0, 3), [("host/0", 2)]), ((3, 6), [(("host/1", "host/2"), 2)])]], num_microbatches=2)
    r0, r1, r2 = (stage_role(plan, rm, r) for r in range(3))
    assert r0.send_to == (((1, 2), 2),) and r0.grad_from == ((1, 2),)
    assert r1.recv_from == ((0, 2),) and r2.recv_from == ((0, 2),)
    assert r1.grad_to == (((0,), 2),) and r2.grad_to == (((), 2),)


def test_every_stage_sees_each_sample_of_the_global_batch_once():
    cluster = cpu4()
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 2), [("host/0", 2), ("host/1", 1)]), ((2, 6), [("host/2", 3)])], [((0, 6), [("host/3", 2)])]],
                     num_microbatches=3)
    for layer in range(6):
        seen = []
        for ri, r in enumerate(plan.replicas):
            for si, s in enumerate(r.stages):
                if s.start <= layer < s.stop:
                    for k in range(len(s.groups)):
                        for m in range(plan.num_microbatches):
                            first, count = device_samples(plan, ri, si, k, m)
                            seen += range(first, first + count)
        assert sorted(seen) == list(range(plan.global_batch))


def test_datasets_are_deterministic_and_shaped():
    for kind in ("synthetic", "text"):
        for classify in (False, True):
            ds = TokenDataset(kind, vocab=256, seq_len=16, seed=3, classify=classify)
            ids, labels = ds.batch(5, 4)
            assert ids.shape == labels.shape == (4, 16) and ids.dtype == torch.int64
            assert torch.equal(ds.batch(5, 4)[0], ids)
            assert int(ids.max()) < 256
            if classify:
                assert set(labels.unique().tolist()) <= {0, 1}
            else:
                assert torch.equal(ids[:, 1:], labels[:, :-1])
    a = TokenDataset("synthetic", vocab=256, seq_len=16, seed=0, classify=False).sample(0)[0]
    b = TokenDataset("synthetic", vocab=256, seq_len=16, seed=1, classify=False).sample(0)[0]
    assert not torch.equal(a, b)


# ---- models -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, cuts", [("gpt2-tiny", [0, 1, 4, 6]), ("bert-tiny", [0, 3, 6]),
                                        ("mlp-tiny", [0, 2, 3, 6])])
def test_stages_chained_equal_the_whole_model_and_own_exactly_their_layers(name, cuts):
    shape = get_model(name)
    built = build_model(shape, seed=0)
    stages = [StageModule(built, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    ids = torch.randint(shape.vocab, (3, 16))
    x = ids
    for s in stages:
        x = s(x)
    assert torch.allclose(x, built.logits(ids), rtol=0, atol=1e-5)
    names = [n for s in stages for n, _ in s.named_model_parameters()]
    assert sorted(names) == sorted(n for n, _ in built.model.named_parameters())
    counts = layer_param_counts(built)
    for s in stages:
        assert sum(p.numel() for p in s.parameters()) == sum(counts[s.start:s.stop])


def test_layer_parameter_counts_match_the_cost_graph_up_to_block_biases():
    for name in ("gpt2-tiny", "bert-tiny", "mlp-tiny"):
        shape = get_model(name)
        counts = layer_param_counts(build_model(shape, seed=0))
        cg = cpu_cost_graph(name, 16)
        assert len(counts) == cg.num_layers
        assert counts[0] == cg.layers[0].params and counts[-1] == cg.layers[-1].params
        # every block's parameters are counted exactly by hetalloc.models (9h + f biases and norms)
        assert all(c == l.params for c, l in zip(counts[1:-1], cg.layers[1:-1]))


# ---- configuration, commands, keys -----------------------------------------------------

def test_config_and_slowdown_validation():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    assert parse_slowdown(["1=2", "host/3=1.5"]) == {"1": 2.0, "host/3": 1.5}
    for bad in ("1", "x=0.5", "=2"):
        with pytest.raises(ValueError, match="--slowdown: .*expected RANK=FACTOR"):
            parse_slowdown([bad])
    assert TrainConfig().learning_rate("sgd") == 0.05


def test_slowdown_in_cpu_time_uses_slowdown_times_the_cpu_of_the_compute():
    """On CPUs the emulated slowdown holds the core as a slower core would: the thread
    uses FACTOR x the CPU time of its compute (what the simulator's shared compute
    slots assume), however much the operating system lets it run meanwhile."""
    import time
    from runtime.config import stretch

    for factor in (1.0, 2.0, 3.0):
        t0, c0 = time.perf_counter(), time.thread_time()
        while time.thread_time() - c0 < 0.02:  # 20 ms of compute
            pass
        used = time.thread_time() - c0
        wall = stretch(t0, factor, c0)
        total = time.thread_time() - c0
        assert total == pytest.approx(factor * used, rel=0.05, abs=1e-3)
        assert wall >= total * 0.99  # wall time is at least the CPU time spent


def test_pace_held_inside_an_op_counts_only_the_compute():
    """A hold inside an op (a gradient bucket ready) holds the thread until a core FACTOR
    slower would be there; the hold at the op's end then stretches only the compute since
    (the first hold's spinning is not compute): FACTOR x the op's compute in all, as one
    hold at the end would give, but with the first part of it before the launch point."""
    import time
    from runtime.config import Pace

    def compute(seconds):
        c = time.thread_time()
        while time.thread_time() - c < seconds:
            pass

    pace = Pace(2.0, cpu=True)
    c0 = pace.cpu0
    compute(0.02)
    pace.hold()
    at_bucket = time.thread_time() - c0
    compute(0.01)
    pace.hold()
    total = time.thread_time() - c0
    assert at_bucket == pytest.approx(2 * 0.02, rel=0.1)  # a device 2x slower reaches the bucket at 40 ms
    assert total == pytest.approx(2 * 0.03, rel=0.1)  # and ends at 60 ms, not 2 x (40 + 10)


def test_pace_in_wall_clock_time_without_cpu_clock():
    """Without a CPU clock (GPU compute is not on the thread) the rule is in wall time."""
    import time
    from runtime.config import Pace, stretch

    pace = Pace(3.0, cpu=False)
    time.sleep(0.01)
    first = pace.hold()
    time.sleep(0.01)
    second = pace.hold()
    assert first == pytest.approx(0.03, abs=0.01) and second == pytest.approx(0.06, abs=0.015)
    t0 = time.perf_counter()
    time.sleep(0.01)
    assert stretch(t0, 2.0) == pytest.approx(0.02, abs=0.008)


def test_node_commands_and_cli_print(tmp_path, capsys):
    cluster, plan = two_node_plan()
    plan.save(tmp_path / "plan.json")
    cmds = node_commands(rank_map(plan, cluster), train_args(tmp_path / "plan.json", steps=3),
                         master_addr="10.0.0.1", master_port=29999)
    assert cmds[1].shell() == (f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m runtime.torchrun --nnodes=2 "
                               f"--node-rank=1 --nproc-per-node=2 --master-addr=10.0.0.1 --master-port=29999 -m runtime.train --plan {tmp_path / 'plan.json'} --steps 3 "
                               f"--plan-node b")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    commands.register(sub)
    args = parser.parse_args(["run", str(tmp_path / "plan.json"), "--steps", "3"])
    assert args.func(args) == 0  # a multi-node plan: prints, does not run
    out = capsys.readouterr().out
    assert "3 ranks on 2 node(s)" in out and "--node-rank=1 --nproc-per-node=2" in out
    from hetalloc.cli import main  # user errors are printed by the CLI's one printer
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("file not found — check the path or run 'hetalloc plan -o' first")
    assert len(err.splitlines()) == 1


def test_plan_key_and_predictions_follow_the_plan():
    cluster = cpu4()
    cg = cpu_cost_graph("gpt2-tiny", 32)
    a = hand_plan(cluster, cg, [[((0, 6), [("host/0", 3), ("host/1", 1)])]], num_microbatches=2)
    b = hand_plan(cluster, cg, [[((0, 6), [("host/0", 2), ("host/1", 2)])]], num_microbatches=2)
    assert plan_key(a) != plan_key(b) and plan_key(a) == plan_key(a)
    pred = predicted_by_device(a, cluster, cg)
    assert set(pred) == {"host/0", "host/1"}
    assert pred["host/0"]["compute_s"] > pred["host/1"]["compute_s"] > 0
    assert pred["host/0"]["grad_sync_s"] == pred["host/1"]["grad_sync_s"] > 0


# ---- one device, in this process ------------------------------------------------------

def test_one_device_plan_trains_without_torchrun(tmp_path, monkeypatch):
    from runtime.train import train
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    plan = hand_plan(cpu4(), cpu_cost_graph("mlp-tiny", 16), [[((0, 6), [("host/2", 8)])]], num_microbatches=2,
                     optimizer="sgd")
    try:
        summary = train(plan, TrainConfig(steps=40, dataset="text", lr=0.5, out_dir=str(tmp_path)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    got = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == 40 and sum(got[-5:]) < sum(got[:5]) - 2.5, got
    assert summary["ranks"][0]["device"] == "host/2"
    assert json.loads((tmp_path / "summary.json").read_text())["measured_steps"] == 39


# ---- tensor-parallel layouts ------------------------------------------------------------

def test_fused_qkv_is_split_by_heads_and_slices_of_slices_are_slices():
    from runtime.tensor_parallel import fused_order, get_slice, head_aligned, set_slice
    # GPT-2's c_attn bias for hidden 4: [q0 q1 q2 q3 | k0..k3 | v0..v3]; two ranks hold
    # [q0 q1 k0 k1 v0 v1] and [q2 q3 k2 k3 v2 v3] (their own heads).
    x = torch.arange(12.0)
    assert head_aligned(x, 0, 3, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    assert torch.equal(fused_order(head_aligned(x, 0, 3, 2), 0, 3, 2), x)
    assert get_slice(x, (0, 3), 2, 1).tolist() == [2, 3, 6, 7, 10, 11]
    # Slice q of m of rank k's part of t is slice k*m + q of t*m of the whole (weights (in, out), dim 1).
    w = torch.arange(3 * 24.0).view(3, 24)
    for layout in ((1, 3), (1, 1), (0, 1)):
        whole = w if layout[0] == 1 else w.T.contiguous()
        for k in range(2):
            part = get_slice(whole, layout, 2, k).contiguous()
            for q in range(2):
                assert torch.equal(get_slice(part, layout, 2, q), get_slice(whole, layout, 4, 2 * k + q)), layout
    y = torch.zeros(12)
    set_slice(y, (0, 3), 2, 1, get_slice(x, (0, 3), 2, 1))
    assert y.tolist() == [0, 0, 2, 3, 0, 0, 6, 7, 0, 0, 10, 11]
    # uneven vocabulary rows (a single device next to a group of 2): torch.chunk, as DTensor shards
    v = torch.arange(5.0)
    assert get_slice(v, (0, 1), 2, 0).tolist() == [0, 1, 2] and get_slice(v, (0, 1), 2, 1).tolist() == [3, 4]


def test_parameter_layouts_follow_the_tensor_parallel_plan():
    from runtime.tensor_parallel import param_layouts
    shape = get_model("gpt2-tiny")
    built = build_model(shape, seed=0)
    lay = param_layouts(StageModule(built, 0, 6), "gpt", 6)
    h = "transformer.h.0."
    assert lay[h + "attn.c_attn.weight"] == (1, 3) and lay[h + "attn.c_attn.bias"] == (0, 3)  # Conv1D (in, out)
    assert lay[h + "attn.c_proj.weight"] == (0, 1) and h + "attn.c_proj.bias" not in lay  # row-parallel: bias whole
    assert lay[h + "mlp.c_fc.weight"] == (1, 1) and lay[h + "mlp.c_fc.bias"] == (0, 1)
    assert h + "ln_1.weight" not in lay and "transformer.wpe.weight" not in lay  # norms, positions whole
    assert lay["transformer.wte.weight"] == (0, 1) and lay["lm_head.weight"] == (0, 1)  # along the vocabulary
    llama = build_model(resolve_model(str(ROOT / "examples" / "llama-tiny.json")), seed=0)
    lay = param_layouts(StageModule(llama, 1, 3), "llama", 6)
    assert lay["model.layers.0.self_attn.k_proj.weight"] == (0, 1)
    assert lay["model.layers.1.mlp.down_proj.weight"] == (1, 1)
    assert "model.embed_tokens.weight" not in lay and "model.layers.0.input_layernorm.weight" not in lay


def test_profile_turns_and_collective_groups():
    """Ranks of a host with more ranks than cores are timed in turns of as many as it has
    cores (the k-th turn holds the k-th run of every host); collectives are measured
    among the first 2, 3, ... ranks of each host and among one rank per host."""
    from runtime.profile.collectives import collective_groups, compute_turns

    assert compute_turns(["a"] * 2, [2, 2]) == [[0, 1]]
    assert compute_turns(["a"] * 4, [2] * 4) == [[0, 1], [2, 3]]
    assert compute_turns(["a"] * 3, [2] * 3) == [[0, 1], [2]]
    assert compute_turns(["a", "a", "b", "b", "b"], [1, 1, 8, 8, 8]) == [[0, 2, 3, 4], [1]]
    assert collective_groups(["a"] * 3) == [("intra", [0, 1]), ("intra", [0, 1, 2])]
    assert collective_groups(["a", "a", "b", "c"]) == [("intra", [0, 1]), ("inter", [0, 2]), ("inter", [0, 2, 3])]


# ---- the launcher's reading of torchrun's stderr -------------------------------------

def test_launcher_keeps_the_ranks_error_line_and_holds_back_torchruns_report():
    """run_filtered on a stand-in for torchrun: a rank's warning passes through, its
    'error:' line is kept, and what follows (torchrun's log lines, its ChildFailedError
    traceback) is held back, not printed."""
    import io
    import sys
    from runtime.launch import run_filtered
    script = "\n".join([
        "import sys",
        "w = sys.stderr.write",
        "w('warning: a rank warns\\n')",
        "w('W1130 15:08:14.388000 1 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 2\\n')",
        "w('note: after a log line, before any failure\\n')",
        "w('error: --slowdown: 5: is not a rank of this run (0..1)\\n')",
        "w('E1130 15:08:14.508000 1 torch/.../api.py:1002] failed (exitcode: 2) local_rank: 0\\n')",
        "w('Traceback (most recent call last):\\n')",
        "w('torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\\n')",
        "print('step:    1  loss:  5.5')",
        "sys.exit(1)"])
    err = io.StringIO()
    rc, errors, held = run_filtered([sys.executable, "-c", script], env=None, err=err)
    assert rc == 1
    assert errors == ["error: --slowdown: 5: is not a rank of this run (0..1)"]
    assert err.getvalue() == "warning: a rank warns\nnote: after a log line, before any failure\n"
    assert held[0].startswith("W1130") and held[-1].startswith("torch.distributed.elastic")
    assert len(held) == 4


def test_a_group_that_cannot_split_the_heads_is_refused_in_one_line():
    from runtime.tensor_parallel import check_divisible
    qwen2 = resolve_model(str(ROOT / "examples" / "qwen2-tiny.json"))  # 4 query heads, 1 key/value head
    check_divisible(qwen2, 1, "plan.json")
    with pytest.raises(SpecError, match="plan.json: groups: qwen2-tiny has 1 key/value heads, which a tensor-parallel "
                                        "group of 2 cannot split evenly — use groups whose size divides 1"):
        check_divisible(qwen2, 2, "plan.json")
    check_divisible(resolve_model(str(ROOT / "examples" / "llama-tiny.json")), 2, "plan.json")  # 4:2 heads, FFN 172
