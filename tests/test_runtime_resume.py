"""Checkpoint and resume are exact: a run killed mid-way (torchrun restarts it from the
last checkpoint) and a run stopped and continued with --resume both end with the same
parameters and losses as an uninterrupted run, with each step once in metrics.jsonl and
a summary over the whole run. Damage across ranks: a truncated rank file of one rank
makes every rank fall back to the checkpoint before; a rank file whose unpickling would
run code is refused on --resume, and nothing runs. Uses the real entry point
(``torchrun -m runtime.train``), 3 ranks, gloo."""

from __future__ import annotations

import os
from pathlib import Path

import json
import shutil

import pytest
import torch

from hetalloc.cluster import load_cluster
from runtime.checkpoint import rank_file
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

    def run(name: str, steps: int, *extra: str, max_restarts: int = 0, ok: bool = True):
        args = ["--plan", str(d / "plan.json"), "--steps", str(steps), "--out", str(d / name / "out"),
                "--checkpoint-dir", str(d / name / "ckpt"), "--checkpoint-every", "5", "--dropout", "0.1", *extra]
        proc = torchrun(3, args, max_restarts=max_restarts)
        assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("straight", STEPS)
    killed = run("killed", STEPS, "--fail-at-step", "7", "--fail-rank", "1", max_restarts=1)
    run("stopped", 7)
    run("stopped", STEPS, "--resume")
    # The same checkpoints, damaged: rank 1's file of step 10 cut short; rank 2's replaced.
    for name in ("truncated", "malicious"):
        shutil.copytree(d / "straight" / "ckpt", d / name / "ckpt")
    f = rank_file(d / "truncated" / "ckpt", STEPS, 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    truncated = run("truncated", STEPS, "--resume")
    torch.save({"step": STEPS, "params": {}, "hook": Payload(d / "pwned")}, rank_file(d / "malicious" / "ckpt", STEPS, 2))
    malicious = run("malicious", STEPS + 2, "--resume", ok=False)
    return d, killed, truncated, malicious


class Payload:
    """Unpickling this runs a shell command (os.system): what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for n in ra:
            assert torch.equal(ra[n], rb[n]), n


def _whole_run(out: Path, straight: list[float]) -> None:
    """metrics.jsonl and every rank's file hold steps 1..STEPS once; the summary covers them."""
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, STEPS + 1))
    for k in range(3):
        rank = [json.loads(l)["step"] for l in (out / f"metrics.rank{k}.jsonl").read_text().splitlines()]
        assert rank == list(range(1, STEPS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["first_step"], summary["last_step"], summary["launch_first_steps"]) == (1, STEPS, [1, 6])
    assert summary["losses"] == straight
    assert summary["measured_steps"] == STEPS - 2  # the first step of each launch is warm-up
    assert all(len(r["measured"]) and r["measured"]["step_s"] > 0 for r in summary["ranks"])


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_and_matches(runs):
    d, killed, _, _ = runs
    assert "step:    7" in killed.stdout  # rank 1 died at the start of step 7; the restart ran it
    _same(checkpoint_params(d / "killed" / "ckpt", STEPS), checkpoint_params(d / "straight" / "ckpt", STEPS))
    straight = losses(d / "straight" / "out")
    # The first attempt logged steps 1-6; the restart resumed from step 5: step 6 once, not twice.
    assert losses(d / "killed" / "out") == straight
    _whole_run(d / "killed" / "out", straight)


@pytest.mark.slow
def test_stop_and_resume_matches(runs):
    d, _, _, _ = runs
    _same(checkpoint_params(d / "stopped" / "ckpt", STEPS), checkpoint_params(d / "straight" / "ckpt", STEPS))
    straight = losses(d / "straight" / "out")
    assert losses(d / "stopped" / "out") == straight
    _whole_run(d / "stopped" / "out", straight)


@pytest.mark.slow
def test_one_ranks_truncated_file_makes_every_rank_fall_back(runs):
    d, _, truncated, _ = runs
    bad = rank_file(d / "truncated" / "ckpt", STEPS, 1)
    warnings = [l for l in truncated.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint step {STEPS} is incomplete: {bad} is "
                                                         "damaged (RuntimeError: PytorchStreamReader")
    assert warnings[0].endswith("; resuming from step 5, the newest complete checkpoint")
    assert "step:    6" in truncated.stdout  # all three ranks went back to step 5
    # ... and trained steps 6-10 again: step 10 rewritten, equal to the uninterrupted run's.
    _same(checkpoint_params(d / "truncated" / "ckpt", STEPS), checkpoint_params(d / "straight" / "ckpt", STEPS))


@pytest.mark.slow
def test_a_malicious_rank_file_is_refused_on_resume_and_never_runs(runs):
    d, _, _, malicious = runs
    assert not (d / "pwned").exists()
    errors = [l for l in malicious.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: {rank_file(d / 'malicious' / 'ckpt', STEPS, 2)}: refused: it holds a reference to "
                      "posix.system, which a checkpoint never does, and loading it could run code — delete the file, "
                      "or resume from a checkpoint directory you trust"]
    assert "step:" not in malicious.stdout
