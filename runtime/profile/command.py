"""``hetalloc profile``: measure this machine with torchrun and write what the planner reads.

    hetalloc profile --nproc 2 [--slowdown 1=2] [--model gpt2-tiny] [--seq 64]
                     [--batch-sizes 1,2,4,8,16] [--out DIR] [--calibrate]

writes DIR/cost_graph.json (measured tables), DIR/cluster.yaml (measured device types,
with the runtime's own time per op and per step from two short training runs, and
links) and DIR/report.json, and prints a short report; ``--calibrate`` also fits the
analytic model's efficiencies to the measurements (DIR/efficiency.json, reusable for
other models and clusters with ``hetalloc plan --efficiency DIR/efficiency.json
[--efficiency-as FITTED=TYPE]``). Plan from the profile with
``hetalloc plan --cluster DIR/cluster.yaml --cost-graph DIR/cost_graph.json --model M``.
Never imports torch (the launched ranks do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hetalloc.calibrate import calibrate, calibration_error, save_efficiency
from hetalloc.checks import output_dir
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import load_cost_graph
from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.models import layer_shapes, resolve_model

from ..config import FAMILIES, check_slowdown, parse_batch_sizes, parse_slowdown
from ..launch import TORCHRUN, RunFailed, local_env
from .files import report_lines, write_cluster
from .overhead import measure_overheads, with_overheads

ENTRY = "runtime.profile"
"""The ranks' module (``-m``): runtime/profile/__main__.py."""


def profile_command(nproc: int, out_dir: str | Path, *, model: str = "gpt2-tiny", seq: int | None = None,
                    batch_sizes: str = "1,2,4,8,16", slowdown: list[str] | None = None, warmup: int = 3,
                    repeats: int = 15, link_repeats: int = 40) -> list[str]:
    """torchrun (as ``python -m runtime.torchrun``: listening on 127.0.0.1 only) for a profile on this machine."""
    argv = [sys.executable, "-m", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
            "-m", ENTRY, "--model", model, "--batch-sizes", batch_sizes, "--warmup", str(warmup),
            "--repeats", str(repeats), "--link-repeats", str(link_repeats), "--out", str(out_dir)]
    if seq is not None:
        argv += ["--seq", str(seq)]
    for s in slowdown or []:
        argv += ["--slowdown", s]
    return argv


def run_profile(out_dir: str | Path, *, nproc: int = 2, model: str = "gpt2-tiny", seq: int | None = None,
                batch_sizes: str = "1,2,4,8,16", slowdown: list[str] | None = None, warmup: int = 3,
                repeats: int = 15, link_repeats: int = 40, calibrate_fit: bool = False, capture: bool = True,
                timeout_s: float | None = None, runtime_overhead: bool = True) -> dict[str, Any]:
    """Profile this machine with `nproc` ranks; returns report.json's content (plus the
    calibration under 'calibration' when asked). With runtime_overhead, also measures the
    runtime's own time per op and per step by running it (runtime.profile.overhead) and
    writes it into cluster.yaml. Raises RunFailed when the ranks fail.

    Everything is measured into OUT/.incomplete and moved into OUT only once complete
    (report.json last), so a failed profile leaves no file the planner would take for a
    profile (an earlier complete profile in OUT stays as it was)."""
    check_profile(nproc, model=model, seq=seq, batch_sizes=batch_sizes, slowdown=slowdown, warmup=warmup,
                  repeats=repeats, link_repeats=link_repeats)
    output_dir(out_dir, "--out")
    out = Path(out_dir)
    stage = out / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        argv = profile_command(nproc, stage, model=model, seq=seq, batch_sizes=batch_sizes, slowdown=slowdown,
                               warmup=warmup, repeats=repeats, link_repeats=link_repeats)
        proc = subprocess.run(argv, env=local_env(nproc), text=True, timeout=timeout_s,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
        output = proc.stdout or ""
        if proc.returncode != 0 or not (stage / "report.json").exists():
            errors = [l for l in output.splitlines() if l.startswith("error:")]
            if errors:
                raise RunFailed(errors[0].removeprefix("error: "))
            tail = "" if not capture else "; last lines:\n" + "\n".join(output.splitlines()[-15:])
            raise RunFailed(f"profile failed: torchrun exited with code {proc.returncode}{tail}")
        report = json.loads((stage / "report.json").read_text())
        if runtime_overhead:
            report["runtime_overhead"] = add_runtime_overhead(stage, slowdown)
        report["files"] = {"cost_graph": str(out / "cost_graph.json"), "cluster": str(out / "cluster.yaml")}
        _publish(stage, out, report)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report["command"] = argv
    if calibrate_fit:
        report["calibration"] = calibrate_profile(out)
    return report


def check_profile(nproc: int, *, model: str, seq: int | None, batch_sizes: str, slowdown: list[str] | None,
                  warmup: int, repeats: int, link_repeats: int) -> None:
    """What the ranks would refuse, refused before any starts (SpecError naming the flag):
    the rank count, the model (buildable by the runtime, --seq within its context), the
    batch sizes, --slowdown (syntax, factor, rank), the repeat counts."""
    for flag, value, low in (("--nproc", nproc, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1),
                             ("--link-repeats", link_repeats, 1)):
        if value < low:
            raise SpecError(flag, "", f"must be a whole number >= {low}, got {value}", f"give {flag} {max(low, 1)} or more")
    shape = resolve_model(model)
    if shape.family not in FAMILIES:
        raise SpecError("--model", "", f"the runtime cannot build '{shape.name}' (family '{shape.family}')",
                        f"runtime families: {', '.join(FAMILIES)}")
    if seq is not None and seq < 1:
        raise SpecError("--seq", "", f"must be a whole number >= 1, got {seq}", "or leave it out for the model's context")
    layer_shapes(shape, seq or shape.max_seq, 4)  # --seq within the model's context
    parse_batch_sizes(batch_sizes)
    check_slowdown(parse_slowdown(slowdown), nproc, None, "profile")


STAGING = ".incomplete"
"""Subdirectory of a profile's OUT where a profile is measured before it is complete."""


def _publish(stage: Path, out: Path, report: dict[str, Any]) -> None:
    """Move a complete profile from `stage` into `out`: the old report.json goes first and
    the new one comes last, so OUT never holds a report next to files of another profile."""
    (out / "report.json").unlink(missing_ok=True)
    (out / "efficiency.json").unlink(missing_ok=True)  # fitted to the old profile
    if (stage / "overhead").exists():
        shutil.rmtree(out / "overhead", ignore_errors=True)
        os.replace(stage / "overhead", out / "overhead")
    for name in ("cost_graph.json", "cluster.yaml"):
        os.replace(stage / name, out / name)
    atomic_write_json(out / "report.json", report)


def add_runtime_overhead(out_dir: str | Path, slowdown: list[str] | None) -> dict[str, Any]:
    """Measure the runtime's per-op and per-step time on the profiled devices and write
    them into DIR/cluster.yaml (runtime.profile.overhead)."""
    out = Path(out_dir)
    cluster = load_cluster(out / "cluster.yaml")
    cg = load_cost_graph(out / "cost_graph.json")
    by_rank = {int(k): f for k, f in parse_slowdown(slowdown).items() if k.isdigit()}
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    threads = {r.get("threads") for r in report.get("ranks", [])}
    result = measure_overheads(out / "overhead", cluster, cg, by_rank, report.get("turns"),
                               threads=threads.pop() if len(threads) == 1 and None not in threads else None)
    write_cluster(out, with_overheads(cluster, result["per_type"]))
    return result


def calibrate_profile(out_dir: str | Path) -> dict[str, Any]:
    """Fit efficiencies to a profile directory; writes DIR/efficiency.json."""
    out = Path(out_dir)
    cg = load_cost_graph(out / "cost_graph.json")
    cluster = load_cluster(out / "cluster.yaml")
    fits = calibrate(cg, cluster.device_types)
    from hetalloc.calibrate import efficiency_map
    check = calibration_error(cg, cluster.device_types, efficiency_map(fits))
    save_efficiency(out / "efficiency.json", fits, source=str(out / "cost_graph.json"), check=check)
    return {"file": str(out / "efficiency.json"), "fits": [f.to_dict() for f in fits], "check": check}


def calibration_lines(cal: dict[str, Any]) -> list[str]:
    lines = [f"calibrated efficiencies ({cal['file']}):"]
    for f in cal["fits"]:
        lines.append(f"  {f['device_type']:<22} {f['kind']:<10} compute {f['compute']:.3g}  tokens_half "
                     f"{f['tokens_half']:.3g}  memory {f['memory']:.3g}  overhead {f['overhead_s'] * 1e6:.0f} µs  "
                     f"(fit on {f['branch']}, rms error {100 * f['rms_rel_error']:.1f}%)")
    c = cal["check"]
    lines.append(f"  analytic model with these factors vs measured whole-model times: median error "
                 f"{100 * c['median_rel_error']:.1f}%, worst {100 * c['max_rel_error']:.1f}% ({c['points']} points)")
    return lines


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="measure this machine's devices and links (torchrun) into a cost graph and cluster spec",
        description="Run torchrun on this machine and measure, on every rank at once: per-layer forward and "
                    "backward seconds at each micro-batch size (median of repeats, spread recorded), parameter, "
                    "saved-activation and output bytes per layer, the optimizer step, matmul throughput, p2p "
                    "latency and bandwidth between ranks and all-reduce time. Writes OUT/cost_graph.json, "
                    "OUT/cluster.yaml and OUT/report.json in the formats 'hetalloc plan' reads.")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine (default 2)")
    p.add_argument("--slowdown", action="append", metavar="RANK=FACTOR",
                   help="profile RANK as 'hetalloc run --slowdown RANK=FACTOR' runs it (its own device type "
                        "<name>-slow<FACTOR>x): a CPU machine standing in for a mixed one; repeatable")
    p.add_argument("--model", default="gpt2-tiny", help="built-in model or Hugging Face config.json (default gpt2-tiny)")
    p.add_argument("--seq", type=int, default=None, help="sequence length in tokens (default: the model's context)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16",
                   help="micro-batch sizes in samples to time, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes per batch size (default 3)")
    p.add_argument("--repeats", type=int, default=15, help="timed passes per batch size; the median is kept (default 15)")
    p.add_argument("--link-repeats", type=int, default=40, help="timed transfers per message size (default 40)")
    p.add_argument("--out", default="out/profile", metavar="DIR", help="output directory (default out/profile)")
    p.add_argument("--calibrate", action="store_true",
                   help="also fit the analytic model's efficiency factors (OUT/efficiency.json)")
    p.add_argument("--no-runtime-overhead", action="store_true",
                   help="skip the two short training runs that measure the runtime's own time per op and per "
                        "step (written into OUT/cluster.yaml as op_overhead_us / step_overhead_us)")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace) -> int:
    report = run_profile(args.out, nproc=args.nproc, model=args.model, seq=args.seq, batch_sizes=args.batch_sizes,
                         slowdown=args.slowdown, warmup=args.warmup, repeats=args.repeats,
                         link_repeats=args.link_repeats, calibrate_fit=args.calibrate,
                         runtime_overhead=not args.no_runtime_overhead)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "command"}, indent=2))
        return 0
    cg = load_cost_graph(Path(args.out) / "cost_graph.json")
    for line in report_lines(report, cg):
        print(line)
    if "calibration" in report:
        for line in calibration_lines(report["calibration"]):
            print(line)
    print(f"wrote {args.out}/cost_graph.json, {args.out}/cluster.yaml, {args.out}/report.json"
          + (f", {args.out}/efficiency.json" if args.calibrate else ""))
    print(f"plan from it: hetalloc plan --cluster {args.out}/cluster.yaml --cost-graph {args.out}/cost_graph.json "
          f"--model {args.model} --global-batch N")
    return 0
