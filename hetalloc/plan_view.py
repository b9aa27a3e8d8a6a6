"""Human-readable views of a plan: a rich table of stages and a summary of figures.

Only formatting lives here; every number comes from the plan's recorded predictions
(hetalloc.evaluate) and solver record.
"""

from __future__ import annotations

import math
from collections import Counter

from rich.console import Console
from rich.table import Table

from .cluster import Cluster
from .plan import Group, Plan


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def device_summary(cluster: Cluster, ids: list[str]) -> str:
    c = Counter(cluster.device(d).type for d in ids)
    return ", ".join(f"{n}x{t}" for t, n in sorted(c.items()))


def group_shares(cluster: Cluster, groups: list[Group]) -> str:
    """Each group's device type with its own share, in plan order: 'V100-32G:8 T4:4'; a
    tensor-parallel group of t as '(txTYPE):SHARE'; N alike groups as 'Nx...'."""
    alike: dict[tuple[str, int, int], int] = {}
    for g in groups:
        key = (cluster.device(g.lead).type, g.tp, g.share)
        alike[key] = alike.get(key, 0) + 1
    return " ".join(f"{n}x" * (n > 1) + (t if tp == 1 else f"({tp}x{t})") + f":{share}"
                    for (t, tp, share), n in alike.items())


def compact_ranges(xs: list[int]) -> str:
    """[0, 1, 2, 3, 5, 7, 8] -> '0-3,5,7-8'."""
    out: list[list[int]] = []
    for x in sorted(set(xs)):
        if out and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def stage_table(plan: Plan, cluster: Cluster, max_rows: int = 40, max_cell: int = 48) -> Table:
    pred = plan.predicted
    stages = pred.get("stages", [])
    mem = pred.get("memory_bytes", {})
    frac = pred.get("memory_fraction", {})
    t = Table(title=f"plan for {plan.model} on {cluster.name}: {len(plan.replicas)} replica(s), "
                    f"{plan.num_stages} stage(s), {plan.num_microbatches} micro-batches, {plan.schedule}",
              caption="device:share — shares are samples of every micro-batch; NxT:S is N devices of type T "
                      "with S each, (txT) a tensor-parallel group of t. Identical replicas print once.")
    tp = any(st.get("tp_s", 0.0) > 0 for st in stages)  # a column for TP all-reduces only when there are any
    cols = [("replicas", "right"), ("stage", "right"), ("layers", "left"), ("device:share", "left"),
            ("fwd ms", "right"), ("bwd ms", "right")] + ([("tp ms", "right")] if tp else []) + [
            ("p2p ms", "right"), ("sync ms", "right"), ("mem GiB (max %)", "right")]
    for col, just in cols:
        t.add_column(col, justify=just)
    # Identical replicas print once, naming them all: replicas merge only when every cell
    # of every stage but the replica reads the same.
    per_replica: dict[int, list[tuple[str, ...]]] = {}
    for st in stages:
        s = plan.replicas[st["replica"]].stages[st["stage"]]
        ids = s.device_ids()
        shares = group_shares(cluster, s.groups)
        if len(shares) > max_cell:
            shares = shares[:max_cell - 1] + "…"
        peak = max(mem.get(d, 0.0) for d in ids)
        pf = max(frac.get(d, 0.0) for d in ids)
        layers = f"{s.start}-{s.stop - 1}" + (" recompute" if s.recompute != "none" else "")
        per_replica.setdefault(st["replica"], []).append(
            (str(st["stage"]), layers, shares, _ms(st["fwd_s"]), _ms(st["bwd_s"]),
             *([_ms(st.get("tp_s", 0.0))] if tp else []), _ms(st["p2p_s"]), _ms(st.get("sync_s", 0.0)),
             f"{_gib(peak)} ({pf:.0%})"))
    alike: dict[tuple, list[int]] = {}
    for ri, cells in per_replica.items():
        alike.setdefault(tuple(cells), []).append(ri)
    rows = [(compact_ranges(replicas), cells) for stage_cells, replicas in alike.items() for cells in stage_cells]
    for replicas, cells in rows[:max_rows]:
        t.add_row(replicas, *cells)
    if len(rows) > max_rows:
        t.add_row("…", *[""] * (len(cols) - 1))
        t.caption += f" {len(rows) - max_rows} more rows: see --json."
    return t


def summary_lines(plan: Plan, cluster: Cluster) -> list[str]:
    p = plan.predicted
    used = len(plan.device_ids())
    lines = [
        f"iteration   {p['iteration_time_s']:.4f} s  (pipeline {p['pipeline_time_s']:.4f} s, "
        f"grad sync {p['sync_time_s']:.4f} s ({plan.grad_sync}), optimizer {p['optimizer_time_s']:.4f} s)",
        f"throughput  {p['throughput_samples_per_s']:,.1f} samples/s  {p['tokens_per_s']:,.0f} tokens/s  "
        f"MFU {p['mfu']:.1%}  bubble {p['bubble_fraction']:.1%}",
        f"devices     {used} of {cluster.num_devices} used ({device_summary(cluster, plan.device_ids())})",
    ]
    if plan.optimizer_sharding != "none":
        lines.append(f"optimizer   state sharded ({plan.optimizer_sharding}) over each stage's data-parallel devices")
    s = plan.solver
    if s:
        def known(v) -> bool:
            return isinstance(v, (int, float)) and math.isfinite(v)

        gap, bound, obj = s.get("gap"), s.get("bound_s"), s.get("objective_s")
        gap_s = f"{gap:.2%}" if known(gap) else "unknown"
        bound_s = f"{bound:.4f} s" if known(bound) else "none"
        obj_s = f"{obj:.4f} s" if known(obj) else "none (the search found no plan)"
        lines.append(f"solver      {s.get('status')}  objective {obj_s}  "
                     f"bound {bound_s}  gap {gap_s}  {s.get('seconds', 0.0):.1f} s ({s.get('backend', '')})")
    elif plan.planner:
        lines.append(f"planner     {plan.planner} baseline")
    lines += [f"note        {n}" for n in plan.notes]
    return lines


def wide_console(stderr: bool = False) -> Console:
    """A console at least 120 columns wide, so plan tables do not wrap in pipes and CI logs."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=max(120, probe.width))


def print_plan(plan: Plan, cluster: Cluster, console: Console | None = None) -> None:
    console = console or wide_console()
    console.print(stage_table(plan, cluster))
    for line in summary_lines(plan, cluster):
        console.print(line, highlight=False)
