"""Checkpoint and resume are exact: a run killed mid-way (torchrun restarts it from the
last checkpoint) and a run stopped and continued with --resume both end with the same
parameters and losses as an uninterrupted run. Uses the real entry point
(``torchrun -m runtime.train``), 3 ranks, gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetalloc.cluster import load_cluster
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.testing import checkpoint_params, losses, torchrun

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    # A stage of width 2 feeding one of width 1, with a sharded parameter server: the
    # checkpoint holds each rank's own optimizer shards.
    plan = hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 3), [("host/0", 1), ("host/1", 1)]), ((3, 6), [("host/2", 2)])]],
                     num_microbatches=2, schedule="1f1b", grad_sync="param_server")
    plan.save(d / "plan.json")

    def run(name: str, steps: int, *extra: str, max_restarts: int = 0):
        args = ["--plan", str(d / "plan.json"), "--steps", str(steps), "--out", str(d / name / "out"),
                "--checkpoint-dir", str(d / name / "ckpt"), "--checkpoint-every", "5", "--dropout", "0.1", *extra]
        proc = torchrun(3, args, max_restarts=max_restarts)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("straight", STEPS)
    killed = run("killed", STEPS, "--fail-at-step", "7", "--fail-rank", "1", max_restarts=1)
    run("stopped", 7)
    run("stopped", STEPS, "--resume")
    return d, killed


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for n in ra:
            assert torch.equal(ra[n], rb[n]), n


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_and_matches(runs):
    d, killed = runs
    assert "step:    7" in killed.stdout  # rank 1 died at the start of step 7; the restart ran it
    _same(checkpoint_params(d / "killed" / "ckpt", STEPS), checkpoint_params(d / "straight" / "ckpt", STEPS))
    straight = losses(d / "straight" / "out")
    got = losses(d / "killed" / "out")
    # metrics.jsonl keeps steps 1-6 of the first attempt, then 6-10 after resuming from step 5.
    assert got[:6] == straight[:6] and got[6:] == straight[5:]


@pytest.mark.slow
def test_stop_and_resume_matches(runs):
    d, _ = runs
    _same(checkpoint_params(d / "stopped" / "ckpt", STEPS), checkpoint_params(d / "straight" / "ckpt", STEPS))
    got = losses(d / "stopped" / "out")
    assert got == losses(d / "straight" / "out")[:7] + losses(d / "straight" / "out")[5:]
