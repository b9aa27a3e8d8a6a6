"""Adapting to stragglers, measured and simulated (issue 11).

    python benchmarks/adaptive.py [--steps 80] [--repeats 2] [--reuse-profile] [--out DIR]
    python benchmarks/adaptive.py --resimulate [--repeats N] --out DIR   # no runs: simulate DIR's again

This machine is profiled (hetalloc profile, GPT-2 tiny, seq 64: 3 ranks, and 2 ranks),
the planner plans from each profile, and each scenario is run for real (torchrun, gloo)
``--repeats`` times without adaptation (``runtime.train --slowdown``) and with it
(``hetalloc run --adaptive``'s workflows.adaptive.run_adaptive), alternately, and
simulated (workflows.episode: the same speed trace, the same monitor, the same
decisions, on the profiled cluster and cost graph; a decision reaches the simulated ranks
as late as the live controller's do: half its poll interval plus the decision, timed on
this machine):

- ``stays``: 3 ranks, rank 1 3x slower from step 20 of 80 (the issue's must-show):
  when the monitor reported it, what was decided, and the throughput over the last 20
  steps with and without adaptation (target: >= 1.3x);
- ``comes-and-goes-3`` / ``-2``: rank 1 3x slower from step 20 to step 50 of 80, on 3
  ranks (time-sharing 2 cores) and on 2 ranks (a core each): throughput over steps 3-80,
  simulated against measured, with and without adaptation (target: within 10 %).

The slowdown is emulated in CPU time (runtime.config.stretch on CPU ranks): the slowed
rank spins until it has used FACTOR x the CPU time of its compute, as a slower core
would; 3 ranks share 2 cores here, and a rank that slept through its slowdown would hand
its core to the others, which would then run faster than the profile measured them.
Measured figures are the median over the repeats. The simulation is compared as it is
and *calibrated*: divided by the ratio of the run's measured to simulated step time
over steps 3-19 (before the straggler; the median over the runs), which takes out how
much slower the whole host is during the runs than during the profile, and leaves what
the simulation says about the straggler and the adaptation. The adaptive runs are also
*replayed*: the simulator plays the shares each run switched to (its obeyed commands)
from the step they took effect, without its own monitor and decisions, which tells the
simulator's timing apart from decisions that went another way than the run's. The
simulated throughput is the episode's (the sum of its steps: noisy iterations' mean).
The load average is printed before every run. Writes OUT/adaptive.json (default OUT:
benchmarks/out); ``--resimulate`` runs nothing and simulates the profiles and runs an
earlier run left under OUT again with the current code (OUT/adaptive-resimulated.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from allocator import make_plan
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import load_plan, plan_from_dict
from runtime import control
from runtime.launch import local_command, local_env, train_args
from runtime.plans import describe
from simulator.episode import SpeedTrace, parse_straggler
from workflows.adaptive import POLL_S, AdaptOptions, Beliefs, decide_shares, run_adaptive
from workflows.episode import EpisodeOptions, replay_episode, run_episode
from workflows.hostload import ForeignCpu
from workflows.loop import profile_batch_sizes, profile_machine

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
BATCH = {3: 24, 2: 16}
WARMUP = 2


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def step_times(out: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["step_time_s"] for r in recs if "event" not in r}


def throughput(times: dict[int, float], first: int, last: int, batch: int) -> float:
    steps = [times[s] for s in range(first, last + 1)]
    return len(steps) * batch / sum(steps)


EXTRA = ["--warmup-steps", str(WARMUP)]


def plain_run(plan_path: Path, nproc: int, out: Path, steps: int, slowdown: list[str]) -> dict[int, float]:
    """The same plan and slowdown without adaptation: runtime.train under torchrun."""
    argv = local_command(nproc, train_args(plan_path, steps=steps, slowdown=slowdown, out_dir=out, extra=EXTRA))
    proc = subprocess.run(argv, env=local_env(nproc), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr[-2000:]}")
    return step_times(out)


def run_pair(plan_path: Path, nproc: int, d: Path, steps: int, slowdown: list[str], k: int) -> dict:
    """One run without and one with adaptation (in that order), with the load before each."""
    row: dict = {}
    row["load_none"] = load()
    with ForeignCpu() as host:
        row["none"] = plain_run(plan_path, nproc, d / f"none-{k}", steps, slowdown)
    row["other_load_none"] = host.share
    row["load_adaptive"] = load()
    with ForeignCpu() as host:
        summary = run_adaptive(plan_path, steps=steps, out_dir=d / f"adaptive-{k}", checkpoint_every=20,
                               slowdown=slowdown, extra=EXTRA, opts=AdaptOptions(),
                               capture=True)
    row["other_load_adaptive"] = host.share
    row["adaptive"] = step_times(d / f"adaptive-{k}")
    row["decisions"] = summary["decisions"]
    row["launches"] = summary["launches"]
    recs = [json.loads(l) for l in (d / f"adaptive-{k}" / "metrics.jsonl").read_text().splitlines()]
    row["reports"] = [r for r in recs if r.get("event") == "straggler"]
    row["switches"] = run_switches(d / f"adaptive-{k}", recs)
    return row


def decision_latency(plan, prof, device: str, factor: float = 3.0, repeats: int = 3) -> float:
    """Seconds from a report to its command, as the live controller takes them on this
    machine: half its poll interval (the report waits for the next read) plus its
    decision for this plan and straggler, timed here (workflows.adaptive; the median of
    `repeats`)."""
    times = []
    for _ in range(repeats):
        beliefs = Beliefs(prof.cluster, prof.cost_graph, factors={device: factor})
        t0 = time.perf_counter()
        decide_shares(plan, beliefs, AdaptOptions(), "timing")
        times.append(time.perf_counter() - t0)
    return POLL_S / 2 + statistics.median(times)


def stored_pair(d: Path, k: int) -> dict:
    """Pair k of an earlier run of this benchmark (its folders under `d`), as run_pair
    returns it (loads unknown)."""
    summary = json.loads((d / f"adaptive-{k}" / "adaptive.json").read_text())
    recs = [json.loads(l) for l in (d / f"adaptive-{k}" / "metrics.jsonl").read_text().splitlines()]
    return {"none": step_times(d / f"none-{k}"), "adaptive": step_times(d / f"adaptive-{k}"),
            "load_none": "n/a", "load_adaptive": "n/a", "other_load_none": None, "other_load_adaptive": None,
            "decisions": summary["decisions"], "launches": summary["launches"],
            "reports": [r for r in recs if r.get("event") == "straggler"],
            "switches": run_switches(d / f"adaptive-{k}", recs)}


def run_switches(out: Path, recs: list[dict]) -> list[tuple[int, dict]] | None:
    """The shares an adaptive run switched to, as (first step under them, plan dict): each
    obeyed 'shares' command (its plan in control/) takes effect after the step that obeyed
    it. None when the run restarted (a replay covers shares switches only)."""
    out_switches = []
    for r in recs:
        if r.get("event") != "decision" or r.get("command") not in ("shares", "restart"):
            continue
        if r["command"] == "restart":
            return None
        out_switches.append((r["step"] + 1, control.read_command(out / "control", r["seq"])["plan"]))
    return out_switches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each kind per scenario, alternating (median)")
    ap.add_argument("--reuse-profile", action="store_true", help="reuse profiles already under the output folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR")
    ap.add_argument("--only", nargs="*", choices=("stays", "comes-and-goes-3", "comes-and-goes-2"))
    ap.add_argument("--resimulate", action="store_true",
                    help="run nothing: simulate again, with the current code, the runs and profiles an earlier run "
                         "left under --out, and compare")
    args = ap.parse_args(argv)
    con = Console(width=150)
    base = Path(args.out) / "adaptive"
    steps = args.steps
    result: dict = {"steps": steps, "repeats": args.repeats, "slowdown": "cpu-time", "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "runs": {}}
    scenarios = [("stays", 3, ["1=3@20"], 20), ("comes-and-goes-3", 3, ["1=3@20", "1=1@50"], 0),
                 ("comes-and-goes-2", 2, ["1=3@20", "1=1@50"], 0)]
    for name, nproc, slowdown, last in scenarios:
        if args.only and name not in args.only:
            continue
        d = base / name
        if not args.resimulate:
            con.print(f"[bold]{name}[/bold]: profiling {nproc} ranks (load {load()}) ...")
        # each scenario profiles afresh (its own folder, so that --resimulate finds it)
        prof = profile_machine(base / f"profile-{name}", nproc=nproc, model="gpt2-tiny", seq=SEQ,
                               batch_sizes=profile_batch_sizes(BATCH[nproc]), reuse=args.reuse_profile or args.resimulate)
        if prof.report.get("share_efficiency_fit"):
            fit = prof.report["share_efficiency_fit"]
            con.print(f"  shared cores: efficiency {fit['share_efficiency']:.3g} (all ranks at once: measured "
                      f"{1e3 * fit['measured_step_s']:.1f} ms/step, simulated at full speed "
                      f"{1e3 * fit['simulated_full_speed_s']:.1f})" + ("" if fit.get("applied", True) else
                      f"; not applied: other processes took {100 * fit['foreign_cpu_share']:.0f}% of the host (fit "
                      f"{fit['fitted']:.3g})"), highlight=False)
        if args.resimulate:
            plan = load_plan(d / "plan.json")
        else:
            plan = make_plan(prof.cluster, prof.cost_graph, BATCH[nproc], time_limit=20)
            d.mkdir(parents=True, exist_ok=True)
            plan.save(d / "plan.json")
        devices = [x.id for x in prof.cluster.devices]
        trace = SpeedTrace([parse_straggler(f"{devices[int(s.split('=')[0])]}={s.split('=')[1]}") for s in slowdown])
        if args.resimulate:
            pairs = [stored_pair(d, k) for k in range(args.repeats) if (d / f"adaptive-{k}" / "adaptive.json").exists()]
        else:
            con.print(f"  plan {describe(plan)}; {args.repeats} x (without, with --adaptive) ...")
            pairs = [run_pair(d / "plan.json", nproc, d, steps, slowdown, k) for k in range(args.repeats)]
        decision_s = decision_latency(plan, prof, devices[1])
        sim = {pol: run_episode(plan, prof.cluster, prof.cost_graph, trace, pol,
                                EpisodeOptions(steps=steps, switch_cost_s=10.0, checkpoint_every=20,
                                               decision_s=decision_s))
               for pol in ("none", "replan")}
        replays = [None if p["switches"] is None else replay_episode(
            plan, prof.cluster, prof.cost_graph, trace, [(k, plan_from_dict(x, "plan")) for k, x in p["switches"]],
            steps)["step_times_s"] for p in pairs]
        B = plan.global_batch
        first = steps - last + 1 if last else WARMUP + 1
        before = range(WARMUP + 1, 20)  # steps before the straggler: calibrates the simulation to this run

        def sim_tp(pol: str) -> float:
            return B * (steps - first + 1) / sum(sim[pol]["step_times_s"][first - 1:steps])

        measured = {kind: statistics.median(throughput(p[kind], first, steps, B) for p in pairs)
                    for kind in ("none", "adaptive")}
        scale = statistics.median(
            statistics.fmean(p[kind][s] for s in before) / statistics.fmean(sim["none"]["step_times_s"][s - 1]
                                                                             for s in before)
            for p in pairs for kind in ("none", "adaptive"))
        simulated = {"none": sim_tp("none"), "adaptive": sim_tp("replan")}
        # the run's own shares, replayed (the simulator's timing without its decisions)
        replayed = statistics.median(B * (steps - first + 1) / sum(r[first - 1:steps]) for r in replays if r) \
            if any(replays) else None
        row = {
            "ranks": nproc, "plan": describe(plan), "slowdown": slowdown, "window": [first, steps],
            "loads": [(p["load_none"], p["load_adaptive"]) for p in pairs],
            # other processes' share of the host's CPU during each run (workflows.hostload)
            "other_load": [(p["other_load_none"], p["other_load_adaptive"]) for p in pairs],
            "reported_at_step": [next((r["step"] for r in p["reports"] if r["device"] == devices[1]
                                       and r["direction"] == "slower" and r["step"] >= 20), None) for p in pairs],
            "decisions": [[(x.get("decided_at_step", x.get("step")), x["action"], x["why"]) for x in p["decisions"]]
                          for p in pairs],
            "restarts": [len(p["launches"]) - 1 for p in pairs],
            "measured_runs": [{k: throughput(p[k], first, steps, B) for k in ("none", "adaptive")} for p in pairs],
            "measured_samples_per_s": measured, "simulated_samples_per_s": simulated,
            "calibration_scale": scale, "replayed_samples_per_s": replayed,
            "share_efficiency_fit": prof.report.get("share_efficiency_fit"), "decision_s": decision_s,
            "replayed_error": None if replayed is None else replayed / measured["adaptive"] - 1,
            "run_switches": [None if p["switches"] is None else [(k, describe(plan_from_dict(x, "plan")))
                                                                for k, x in p["switches"]] for p in pairs],
            "simulated_decisions": {pol: [(x["step"], x["action"]) for x in r["decisions"]] for pol, r in sim.items()},
        }
        # mean step per phase (before the straggler, while it is slow, after), measured (median over
        # the runs) and simulated: where in the episode the simulation departs from the runs
        changes = sorted({int(x.split("@")[1]) for x in slowdown})
        bounds = [WARMUP + 1, *changes, steps + 1]
        phases = {}
        for a, b in zip(bounds, bounds[1:]):
            seg = range(a, b)
            ph = {}
            for kind, pol, reps in (("none", "none", None), ("adaptive", "replan", replays)):
                ph[kind] = {"measured_ms": 1e3 * statistics.median(statistics.fmean(p[kind][s] for s in seg)
                                                                  for p in pairs),
                            "simulated_ms": 1e3 * statistics.fmean(sim[pol]["step_times_s"][s - 1] for s in seg)}
                if kind == "adaptive" and any(reps):
                    ph[kind]["replayed_ms"] = 1e3 * statistics.median(statistics.fmean(r[s - 1] for s in seg)
                                                                     for r in reps if r)
            phases[f"{a}-{b - 1}"] = ph
        row["phases"] = phases
        row["speedup_measured"] = measured["adaptive"] / measured["none"]
        row["speedup_simulated"] = simulated["adaptive"] / simulated["none"]
        row["error"] = {k: simulated[k] / measured[k] - 1 for k in measured}
        row["error_calibrated"] = {k: simulated[k] / scale / measured[k] - 1 for k in measured}
        result["runs"][name] = row
        t = Table(title=f"{name}: {nproc} ranks, {B} samples/step, rank 1 {' '.join(slowdown)}; samples/s over "
                        f"steps {first}-{steps} (median of {args.repeats})")
        for c in ("", "measured", "simulated", "error", "simulated, calibrated", "error"):
            t.add_column(c, justify="right")
        for k, label in (("none", "without adaptation"), ("adaptive", "--adaptive")):
            t.add_row(label, f"{measured[k]:.1f}", f"{simulated[k]:.1f}", f"{100 * row['error'][k]:+.1f}%",
                      f"{simulated[k] / scale:.1f}", f"{100 * row['error_calibrated'][k]:+.1f}%")
        if replayed is not None:
            t.add_row("--adaptive, the run's shares replayed", f"{measured['adaptive']:.1f}", f"{replayed:.1f}",
                      f"{100 * row['replayed_error']:+.1f}%", f"{replayed / scale:.1f}",
                      f"{100 * (replayed / scale / measured['adaptive'] - 1):+.1f}%")
        t.add_row("speed-up", f"{row['speedup_measured']:.2f}x", f"{row['speedup_simulated']:.2f}x", "", "", "")
        con.print(t)
        con.print("  mean step, measured / simulated ms (replayed): " + "; ".join(
            f"steps {k}: without {v['none']['measured_ms']:.1f}/{v['none']['simulated_ms']:.1f}, with "
            f"{v['adaptive']['measured_ms']:.1f}/{v['adaptive']['simulated_ms']:.1f}"
            + (f" ({v['adaptive']['replayed_ms']:.1f})" if "replayed_ms" in v["adaptive"] else "")
            for k, v in phases.items()), highlight=False)
        con.print(f"  runs: {[{k: round(v, 1) for k, v in r.items()} for r in row['measured_runs']]}; straggler "
                  f"reported at step {row['reported_at_step']}; restarts {row['restarts']}; loads (1-min average "
                  f"before each run) {row['loads']}; other processes' share of the CPU during each run "
                  f"{[tuple(None if x is None else round(x, 2) for x in o) for o in row['other_load']]}; calibration scale (measured / simulated step, steps "
                  f"{before.start}-{before.stop - 1}) {scale:.2f}", highlight=False)
    where = base.parent / ("adaptive-resimulated.json" if args.resimulate else "adaptive.json")
    atomic_write_json(where, result)
    con.print(f"wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
