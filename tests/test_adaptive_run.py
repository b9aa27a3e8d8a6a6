"""Adaptive runs for real (``hetalloc run --adaptive``: workflows.adaptive driving torchrun,
3 ranks, gloo, fp64):

- rank 1 slowed 3x from step 20 (of 40 here; benchmarks/adaptive.py runs the 80 of the
  issue): the monitor reports it within 5 steps, the
  workflow re-balances the shares between two steps, and the final parameters equal a
  run that switched to the same plan at the same step by checkpoint and resume by hand,
  and single-process training (the computation every plan must reproduce);
- rank 1 SIGKILLed at the start of step 30 of a parameter-server pipeline: the workflow
  re-plans for the two devices left and resumes from the checkpoint of step 20 under the
  new layout (the optimizer shards resharded); the final parameters equal a run that
  did that switch by hand, and single-process training: no update lost or applied twice.

The throughput figures (adaptive against not, simulated against measured) are
benchmarks/adaptive.py's: timings on this shared 2-core machine are too noisy to test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hetalloc.cluster import load_cluster
from hetalloc.costgraph import Efficiency
from hetalloc.plan import load_plan
from runtime.config import TrainConfig
from runtime.testing import checkpoint_params, max_relative_error, records, torchrun
from simulator.scenarios import Case, fail

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


def cost_graph():
    from runtime.plans import cpu_cost_graph
    cg = cpu_cost_graph("gpt2-tiny", SEQ)
    return cg.with_efficiency({"CPU": {k: Efficiency(compute=0.05, tokens_half=0.0) for k in {l.kind for l in cg.layers}}})


def cluster3():
    return fail("host/3")(Case(load_cluster(ROOT / "examples" / "cpu-4.yaml"), None, 1, None)).cluster


def hand(replicas, **kw):
    from runtime.plans import hand_plan
    return hand_plan(cluster3(), cost_graph(), replicas, num_microbatches=2, **kw)


def common(out: Path, ckpt: Path, steps: int, every: int) -> list[str]:
    return ["--steps", str(steps), "--out", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(every),
            "--dtype", "float64", "--warmup-steps", "2"]


def reference(plan_path: Path, steps: int):
    from runtime.reference import reference_run
    return reference_run(load_plan(plan_path), TrainConfig(steps=steps, dtype="float64"))[1]


def check_equal(a: list, b: list) -> float:
    """Every parameter of every rank of one run against the same parameter in another."""
    ref = {n: t for r in b for n, t in r.items()}
    return max_relative_error(a, ref)[0]


def run(plan_path: Path, out: Path, steps: int, every: int, **kw):
    from workflows.adaptive import AdaptOptions, run_adaptive
    return run_adaptive(plan_path, steps=steps, out_dir=out, checkpoint_dir=out / "ckpt", checkpoint_every=every,
                        extra=["--dtype", "float64", "--warmup-steps", "2"], opts=AdaptOptions(),
                        capture=True, timeout_s=600, **kw)


@pytest.mark.slow
def test_a_straggler_is_found_within_five_steps_and_the_shares_follow(tmp_path):
    plan = hand([[((0, 6), [("host/0", 4), ("host/1", 4), ("host/2", 4)])]])
    plan.save(tmp_path / "plan.json")
    steps = 40
    got = run(tmp_path / "plan.json", tmp_path / "adaptive", steps, 10, slowdown=["1=3@20"])
    out = tmp_path / "adaptive"
    slow = [r for r in records(out, "straggler") if r["device"] == "host/1" and r["direction"] == "slower"
            and r["step"] >= 20]
    assert slow and slow[0]["step"] <= 24, got["output"][-3000:]  # steps 20..24: within 5 steps
    decisions = records(out, "decision")
    # On a loaded 2-core machine another rank may be reported too (noise, rebalanced
    # like any report): the switch rank 1's report caused is the one checked here.
    first = next(d for d in decisions if d.get("command") == "shares" and d["decided_at_step"] >= slow[0]["step"]
                 and "rank 1 (host/1) slower" in d["trigger"])
    assert first["action"] == "shares" and first["decided_at_step"] <= 24, first
    assert [r["step"] for r in records(out)] == list(range(1, steps + 1))  # one launch, each step once
    assert any(l.startswith("adapt: step ") and "-> shares: " in l for l in got["output"].splitlines())
    # By hand: each plan the run switched to, from the step it switched after, by checkpoint
    # and resume (all in one torchrun: the same three ranks).
    chain = []
    for i, d in enumerate(d for d in decisions if d.get("command") == "shares" and d["step"] < steps):
        switched = json.loads((out / "control" / f"command_{d['seq']:05d}.json").read_text())["plan"]
        (tmp_path / f"b{i}.json").write_text(json.dumps(switched))
        chain.append({"after": d["step"], "plan": str(tmp_path / f"b{i}.json")})
    (tmp_path / "chain.json").write_text(json.dumps(chain))
    proc = torchrun(3, [str(tmp_path), str(steps)], script=__file__)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = checkpoint_params(out / "ckpt", steps)
    assert check_equal(final, checkpoint_params(tmp_path / "hand" / "ckpt", steps)) <= 1e-9
    assert max_relative_error(final, reference(tmp_path / "plan.json", steps))[0] <= 1e-9


@pytest.mark.slow
def test_a_killed_rank_is_planned_around_and_training_goes_on_from_the_last_checkpoint(tmp_path):
    plan = hand([[((0, 3), [("host/0", 2), ("host/1", 2)]), ((3, 6), [("host/2", 4)])]], grad_sync="param_server")
    plan.save(tmp_path / "plan.json")
    steps = 40
    got = run(tmp_path / "plan.json", tmp_path / "adaptive", steps, 10,
              first_launch_extra=["--fail-at-step", "30", "--fail-rank", "1"])
    out = tmp_path / "adaptive"
    lost = [d for d in records(out, "decision") if "lost" in d["trigger"]]
    assert len(lost) == 1 and lost[0]["trigger"] == "rank 1 (host/1) lost (killed by SIGKILL)", got["output"][-3000:]
    assert lost[0]["step"] == 29 and lost[0]["resume_step"] == 20 and lost[0]["action"] == "replan"
    launches = got["launches"]
    assert [l["world_size"] for l in launches[:2]] == [3, 2] and launches[0]["lost"] == ["host/1"]
    new_plan = Path(launches[1]["plan"])
    assert "host/1" not in load_plan(new_plan).device_ids()
    assert [r["step"] for r in records(out)] == list(range(1, steps + 1))  # steps 21-29 once, from the checkpoint
    assert "resumed from step 20 saved by another plan" in got["output"]
    # By hand: the first plan to step 20, then the new plan resumed from its checkpoint.
    hand_dir = tmp_path / "hand"
    first = torchrun(3, ["--plan", str(tmp_path / "plan.json"), *common(hand_dir, hand_dir / "ckpt", 20, 10)],
                     timeout_s=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    then = torchrun(2, ["--plan", str(new_plan), *common(hand_dir, hand_dir / "ckpt", steps, 10), "--resume"],
                    timeout_s=300)
    assert then.returncode == 0, then.stdout[-3000:] + then.stderr[-3000:]
    final = checkpoint_params(out / "ckpt", steps)
    assert len(final) == 2
    assert check_equal(final, checkpoint_params(hand_dir / "ckpt", steps)) <= 1e-9
    assert max_relative_error(final, reference(tmp_path / "plan.json", steps))[0] <= 1e-9


def by_hand(workdir: Path, steps: int) -> None:
    """Runs under torchrun (3 ranks): the first plan, then each plan of chain.json resumed
    from the step it was switched to after."""
    import torch.distributed as dist

    from runtime.train import train
    cfg = dict(out_dir=str(workdir / "hand"), checkpoint_dir=str(workdir / "hand" / "ckpt"), dtype="float64")
    chain = json.loads((workdir / "chain.json").read_text())
    plans = [str(workdir / "plan.json")] + [c["plan"] for c in chain]
    ends = [c["after"] for c in chain] + [steps]
    for i, (plan, end) in enumerate(zip(plans, ends)):
        every = 10 if i == len(plans) - 1 else end
        train(load_plan(plan), TrainConfig(steps=end, checkpoint_every=every, resume=i > 0, **cfg))
    dist.destroy_process_group()


if __name__ == "__main__":
    from runtime.train import exit_rank  # leave without interpreter finalization (see there)

    by_hand(Path(sys.argv[1]), int(sys.argv[2]))
    exit_rank(0)
