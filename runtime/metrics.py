"""What a run measures, the per-step log line, and the measured-versus-predicted summary.

Every rank times each step in the categories below; the sum of the categories is the
time spent in compute or communication, and ``other_s`` is what the runtime itself
costs (Python bookkeeping, data, slicing). Rank 0 prints one fixed-width line per step
and writes metrics.jsonl; every rank writes metrics.rank<k>.jsonl (each step once, also
across restarts and resumes); at the end rank 0 writes summary.json over the whole run,
comparing the measured step time and per-rank times with the plan's predictions (``hetalloc.evaluate``: the same formulas the planner optimised).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.evaluate import build_pipe, optimizer_times, sync_groups
from hetalloc.fileio import atomic_write_text
from hetalloc.plan import Plan

SUMMARY_SCHEMA_VERSION = 1


@dataclass(slots=True)
class StepTimes:
    """Seconds one rank spent in one step, by category."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    p2p_wait_s: float = 0.0
    """Blocked on activation/gradient receives and on unfinished sends."""
    grad_sync_s: float = 0.0
    """Waiting for the gradient all-reduce (or parameter-server push) after backward."""
    optimizer_s: float = 0.0
    """Optimizer step (for the parameter server also the pull of updated shards)."""
    loss_sync_s: float = 0.0
    """End-of-step loss reduction: waiting for the slowest rank."""
    data_s: float = 0.0
    """Building this rank's inputs and labels (part of other_s)."""
    step_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def other_s(self) -> float:
        return max(0.0, self.step_s - (self.compute_s + self.p2p_wait_s + self.grad_sync_s
                                       + self.optimizer_s + self.loss_sync_s))

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["compute_s"] = self.compute_s
        d["other_s"] = self.other_s
        return d


MEASURED_KEYS = ("step_s", "compute_s", "forward_s", "backward_s", "p2p_wait_s", "grad_sync_s", "optimizer_s",
                 "loss_sync_s", "data_s", "other_s")


def step_line(step: int, loss: float, step_s: float, samples_per_s: float) -> str:
    return f"step: {step:4d}  loss: {loss:8.5f}  time: {step_s:6.3f}s  samples/s: {samples_per_s:8.1f}"


def eval_line(step: int, val_loss: float, eval_s: float) -> str:
    return f"eval: {step:4d}  val_loss: {val_loss:8.5f}  time: {eval_s:6.3f}s"


class MetricsWriter:
    """Appends one JSON line per step to this rank's file (and rank 0's metrics.jsonl).

    A launch that resumes from checkpoint step S (``resume_after=S``) first cuts both
    files back to steps 1..S, one line each (a killed attempt may have gone further, and
    its last line may be torn), and keeps those lines in ``rank_history`` /
    ``main_history``: the files then hold every step exactly once, and the summary can
    cover the whole run. Every rank line records the first step of the launch that
    wrote it (``launch_first_step``), so that each launch's warm-up is known later.
    """

    def __init__(self, out_dir: str | Path, rank: int, *, resume_after: int = 0, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.launch_first_step = resume_after + 1
        rank_path, main_path = self.out_dir / f"metrics.rank{rank}.jsonl", self.out_dir / "metrics.jsonl"
        self.rank_history = keep_steps(rank_path, resume_after)
        self.main_history = keep_steps(main_path, resume_after) if rank == 0 else []
        self.rank_file: TextIO = open(rank_path, "a")
        self.main_file: TextIO | None = open(main_path, "a") if rank == 0 else None
        self.tb = None
        if tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: events of a killed attempt past the checkpoint are dropped
                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.launch_first_step)
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only (pip install tensorboard)")

    def write(self, step: int, times: StepTimes, loss: float, samples_per_s: float, tokens_per_s: float,
              extra: dict[str, float] | None = None) -> None:
        """One step's record; `extra` (e.g. val_loss after an evaluation) joins rank 0's
        metrics.jsonl record and TensorBoard."""
        extra = extra or {}
        rec = {"step": step, "rank": self.rank, "launch_first_step": self.launch_first_step, **times.to_dict()}
        self.rank_file.write(json.dumps(rec) + "\n")
        self.rank_file.flush()
        if self.main_file is not None:
            main = {"step": step, "loss": loss, "step_time_s": times.step_s, "samples_per_s": samples_per_s,
                    "tokens_per_s": tokens_per_s, **extra, "rank0": times.to_dict()}
            self.main_file.write(json.dumps(main) + "\n")
            self.main_file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("step_time(s)", times.step_s, step)
            self.tb.add_scalar("samples_per_s", samples_per_s, step)
            for key, value in extra.items():
                self.tb.add_scalar(key, value, step)

    def write_record(self, record: dict[str, Any]) -> None:
        """An event record (``{"event": ...}``: a straggler found, a decision obeyed) into
        rank 0's metrics.jsonl, between the step records."""
        if self.main_file is not None:
            self.main_file.write(json.dumps(record) + "\n")
            self.main_file.flush()

    def close(self) -> None:
        self.rank_file.close()
        if self.main_file is not None:
            self.main_file.close()
        if self.tb is not None:
            self.tb.close()


def keep_steps(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Rewrite a metrics file (atomically) to hold steps 1..last_step once each, in order
    (the last line written for a step wins; torn or foreign lines go), and every event
    record (``{"event": ...}``: what an adaptive run saw and decided, also past the
    checkpoint, in the order written); returns the kept step records. last_step 0
    empties it."""
    kept: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    if last_step > 0 and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and "event" in rec:
                events.append(rec)
            elif isinstance(step, int) and 1 <= step <= last_step:
                kept[step] = rec
    records = [kept[s] for s in sorted(kept)]
    ordered = sorted([(r["step"], 0, i, r) for i, r in enumerate(records)]
                     + [(e["step"], 1, i, e) for i, e in enumerate(events)], key=lambda x: x[:3])
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for *_, r in ordered))
    return records


def times_from_record(rec: dict[str, Any]) -> StepTimes:
    """A rank line of metrics.rank<k>.jsonl back as StepTimes."""
    return StepTimes(**{f.name: float(rec.get(f.name, 0.0)) for f in fields(StepTimes)})


def measured_records(launches: list[tuple[int, StepTimes]], warmup_steps: int) -> list[StepTimes]:
    """The steps a summary averages: (launch_first_step, times) in step order, less each
    launch's first warmup_steps (a launch no longer than that is kept whole)."""
    out: list[StepTimes] = []
    groups: dict[int, list[StepTimes]] = {}
    for first, times in launches:
        groups.setdefault(first, []).append(times)
    for first in sorted(groups):
        g = groups[first]
        out += g[warmup_steps:] if len(g) > warmup_steps else g
    return out


def mean_times(records: list[StepTimes]) -> dict[str, float]:
    if not records:
        return {k: 0.0 for k in MEASURED_KEYS}
    return {k: statistics.fmean(getattr(r, k) for r in records) for k in MEASURED_KEYS}


def predicted_by_device(plan: Plan, cluster: Cluster, cg: CostGraph) -> dict[str, dict[str, float]]:
    """Per device, per step: predicted compute, sends, gradient sync and optimizer seconds."""
    out: dict[str, dict[str, float]] = {}
    M = plan.num_microbatches
    for ri in range(len(plan.replicas)):
        pipe = build_pipe(plan, ri, cluster, cg)
        for i, g in enumerate(pipe.groups):
            for dev in g.devices:
                out[dev] = {"compute_s": M * (pipe.compute_fwd[i] + pipe.compute_bwd[i]),
                            "p2p_s": M * (pipe.send_fwd[i] + pipe.send_bwd[i]), "grad_sync_s": 0.0}
    for g in sync_groups(plan, cluster, cg):
        for d in g.devices:
            out[d]["grad_sync_s"] += g.time_s
    for d, t in optimizer_times(plan, cluster, cg).items():
        out[d]["optimizer_s"] = t
    return out


def build_summary(plan: Plan, cluster: Cluster, cg: CostGraph, per_rank: list[dict[str, Any]],
                  losses: list[float], measured_steps: int, first_step: int,
                  launch_first_steps: list[int] | None = None) -> dict[str, Any]:
    """per_rank[r]: {'device', 'role': {...}, 'slowdown', 'mean': mean_times(...), 'step_times_s': [...]};
    losses: one per step from first_step on; launch_first_steps: where each launch of the
    run began (1, then each restart or resume)."""
    pred = predicted_by_device(plan, cluster, cg)
    step_times = per_rank[0]["step_times_s"]
    step_mean = statistics.fmean(step_times) if step_times else 0.0
    ranks = []
    for r, info in enumerate(per_rank):
        m = info["mean"]
        p = pred[info["device"]]
        ranks.append({"rank": r, "device": info["device"], **info["role"], "slowdown": info["slowdown"],
                      "measured": m, "predicted": p,
                      "other_fraction": m["other_s"] / m["step_s"] if m["step_s"] > 0 else 0.0})
    predicted_s = plan.predicted.get("iteration_time_s")
    measured = {
        "step_time_s": step_mean,
        "step_time_median_s": statistics.median(step_times) if step_times else 0.0,
        "samples_per_s": plan.global_batch / step_mean if step_mean > 0 else 0.0,
        "tokens_per_s": plan.global_batch * plan.seq_len / step_mean if step_mean > 0 else 0.0,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "overhead_fraction_max": max((x["other_fraction"] for x in ranks), default=0.0),
    }
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "kind": "run_summary",
        "plan": {"planner": plan.planner, "model": plan.model, "seq_len": plan.seq_len,
                 "global_batch": plan.global_batch, "num_microbatches": plan.num_microbatches,
                 "schedule": plan.schedule, "grad_sync": plan.grad_sync, "optimizer": plan.optimizer,
                 "replicas": len(plan.replicas), "world_size": len(per_rank)},
        "first_step": first_step,
        "last_step": first_step + len(losses) - 1,
        "launch_first_steps": launch_first_steps if launch_first_steps is not None else [first_step],
        "measured_steps": measured_steps,
        "measured": measured,
        "predicted": {k: plan.predicted.get(k) for k in ("iteration_time_s", "pipeline_time_s", "sync_time_s",
                                                         "optimizer_time_s", "throughput_samples_per_s")},
        "measured_over_predicted": step_mean / predicted_s if predicted_s else None,
        "losses": losses,
        "ranks": ranks,
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run report: per rank measured (and predicted) seconds per step."""
    lines = [f"{'rank':>4}  {'device':<10} {'rep':>3} {'stage':>5} {'share':>5}  {'compute':>8} {'p2p':>7} "
             f"{'sync':>7} {'optim':>7} {'other':>7} {'other%':>6}  |  {'pred comp':>9} {'pred sync':>9}"]
    for r in summary["ranks"]:
        m, p = r["measured"], r["predicted"]
        lines.append(f"{r['rank']:>4}  {r['device']:<10} {r['replica']:>3} {r['stage']:>5} {r['share']:>5}  "
                     f"{m['compute_s']:8.4f} {m['p2p_wait_s']:7.4f} {m['grad_sync_s']:7.4f} {m['optimizer_s']:7.4f} "
                     f"{m['other_s']:7.4f} {100 * r['other_fraction']:5.1f}%  |  {p['compute_s']:9.4f} "
                     f"{p['grad_sync_s']:9.4f}")
    ms = summary["measured"]
    pred = summary["predicted"]["iteration_time_s"]
    ratio = summary["measured_over_predicted"]
    lines.append(f"step time over {summary['measured_steps']} steps: measured {ms['step_time_s']:.4f} s "
                 f"({ms['samples_per_s']:.1f} samples/s), predicted "
                 + (f"{pred:.4f} s (measured/predicted = {ratio:.2f})" if pred else "n/a"))
    return "\n".join(lines)
