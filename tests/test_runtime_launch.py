"""Launching plans: `hetalloc run`'s library path on a planner plan (metrics, summary,
falling loss, emulated slow device), a wrong world size failing before training, and a
two-node plan started with the per-node commands the CLI prints (hierarchical gradient
sync across the emulated nodes, checked against single-process training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from allocator import make_plan
from hetalloc.cluster import cluster_from_dict, load_cluster
from runtime.config import TrainConfig
from runtime.launch import free_port, local_env, node_commands, run_local, train_args
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.rankmap import rank_map
from runtime.testing import checkpoint_params, losses, max_relative_error, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planner_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cluster = load_cluster(ROOT / "examples" / "cpu-2-slow.yaml")
    plan = make_plan(cluster, cpu_cost_graph("gpt2-tiny", 32), 16, time_limit=10)
    plan.save(d / "plan.json")
    summary = run_local(d / "plan.json", steps=30, slowdown=["host/1=2"], out_dir=d / "out", capture=True,
                        extra=["--dataset", "text", "--lr", "3e-3"])
    return d, plan, summary


@pytest.mark.slow
def test_run_local_reports_measured_next_to_predicted(planner_run):
    d, plan, summary = planner_run
    assert summary["measured_steps"] == 29  # the first step is warm-up
    assert summary["predicted"]["iteration_time_s"] == plan.predicted["iteration_time_s"]
    assert summary["measured"]["step_time_s"] > 0
    assert summary["measured_over_predicted"] == pytest.approx(
        summary["measured"]["step_time_s"] / plan.predicted["iteration_time_s"])
    assert len(summary["ranks"]) == len(plan.device_ids())
    for r in summary["ranks"]:
        m = r["measured"]
        parts = m["compute_s"] + m["p2p_wait_s"] + m["grad_sync_s"] + m["optimizer_s"] + m["loss_sync_s"] + m["other_s"]
        assert parts == pytest.approx(m["step_s"], rel=1e-6)
        assert r["slowdown"] == (2.0 if r["device"] == "host/1" else 1.0)
    lines = [l for l in summary["output"].splitlines() if l.startswith("step:")]
    assert len(lines) == 30 and "loss:" in lines[0] and "samples/s:" in lines[0]
    records = [json.loads(l) for l in (d / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all((d / "out" / f"metrics.rank{k}.jsonl").exists() for k in range(len(summary["ranks"])))


@pytest.mark.slow
def test_loss_falls_on_the_shipped_text(planner_run):
    d, _, _ = planner_run
    got = losses(d / "out")
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.5, got


@pytest.mark.slow
def test_wrong_world_size_fails_before_training(tmp_path):
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    plan = hand_plan(cluster, cpu_cost_graph("mlp-tiny", 16), [[((0, 6), [("host/0", 1), ("host/1", 1)])]],
                     num_microbatches=1)
    plan.save(tmp_path / "plan.json")
    proc = torchrun(3, ["--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")])
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: torchrun: WORLD_SIZE: is 3 but the plan uses 2 devices — launch with "
                      "--nproc-per-node=2"]
    assert "step:" not in proc.stdout


TWO_HOSTS = {"name": "two-hosts", "nodes": [
    {"name": "a", "gpus": [{"type": "CPU", "count": 2}], "intra_link": "SharedMem", "nic": "Eth-100G"},
    {"name": "b", "gpus": [{"type": "CPU", "count": 2}], "intra_link": "SharedMem", "nic": "Eth-100G"}]}


@pytest.mark.slow
def test_two_node_plan_with_printed_commands_matches_single_process(tmp_path):
    from runtime.reference import reference_run
    cluster = cluster_from_dict(TWO_HOSTS)
    # A pipeline across the nodes and two one-stage replicas: every layer's gradient group
    # spans both nodes, with one or two members per node.
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 3), [("a/0", 2)]), ((3, 6), [("b/0", 2)])], [((0, 6), [("a/1", 1)])],
                      [((0, 6), [("b/1", 3)])]], num_microbatches=2, grad_sync="hierarchical")
    plan.save(tmp_path / "plan.json")
    args = train_args(tmp_path / "plan.json", steps=5, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                      checkpoint_every=5, extra=["--dtype", "float64"])
    cmds = node_commands(rank_map(plan, cluster), args, master_addr="127.0.0.1", master_port=free_port())
    assert [(c.node, c.node_rank, c.nproc) for c in cmds] == [("a", 0, 2), ("b", 1, 2)]
    env = local_env(2) | {"OMP_NUM_THREADS": "1"}
    assert all(c.argv[:3] == ["python", "-m", "runtime.torchrun"] for c in cmds)
    procs = [subprocess.Popen([sys.executable, *c.argv[1:]], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    ref_losses, ref = reference_run(plan, TrainConfig(steps=5, dtype="float64"))
    err, name = max_relative_error(checkpoint_params(tmp_path / "ckpt", 5), ref)
    assert err <= 1e-5, name
    assert losses(tmp_path / "out") == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.slow
def test_cli_run_prints_steps_and_no_launcher_noise(tmp_path):
    """'hetalloc run' as a user starts it: the ranks' step lines on stdout, nothing from
    torchrun's logger on stderr (the launcher reads the ranks' stderr line by line)."""
    cluster = load_cluster(ROOT / "examples" / "cpu-2-slow.yaml")
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32), [[((0, 3), [("host/0", 2)]), ((3, 6), [("host/1", 2)])]],
                     num_microbatches=2)
    plan.save(tmp_path / "plan.json")
    proc = subprocess.run([sys.executable, "-m", "hetalloc.cli", "run", "plan.json", "--steps", "2", "--out", "out"],
                          cwd=tmp_path, env=local_env(2) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [l.split()[1] for l in proc.stdout.splitlines() if l.startswith("step:")] == ["1", "2"]
    assert proc.stderr == ""
    assert (tmp_path / "out" / "summary.json").exists()
