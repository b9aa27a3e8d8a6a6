"""Figures (matplotlib, Agg backend, PNG): the schedule as a Gantt chart, busy/idle per
device, what-if scenarios side by side, and sweeps as line plots.

Never: compute figures here, and never open a window (headless machines).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from hetalloc.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from .report import SimReport

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "optimizer": "#8C8C8C", "tp": "#937860", "send": "#8172B3",
           "allreduce": "#C44E52", "reducescatter": "#DA8BC3", "allgather": "#CCB974"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _scale(t_max: float) -> tuple[float, str]:
    return (1e3, "ms") if t_max < 2 else (1.0, "s")


def gantt(report: "SimReport", path, max_devices: int = 48) -> None:
    """One row per simulated device: compute ops on top, p2p and collectives below."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    res = report.result
    devices = list(res.work)[:max_devices]
    row = {d: i for i, d in enumerate(devices)}
    k, unit = _scale(report.iteration_ends_s[-1])
    fig, ax = plt.subplots(figsize=(12, 0.9 + 0.42 * len(devices)))
    lanes = {"compute": (0.05, 0.5), "tp": (0.05, 0.5), "p2p": (0.58, 0.17), "collective": (0.77, 0.17)}
    bars: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for a in res.activities:
        if a.device in row and a.t1 > a.t0:
            bars.setdefault((row[a.device], a.lane, a.kind), []).append((a.t0 * k, (a.t1 - a.t0) * k))
    for (r, lane, kind), spans in bars.items():
        off, h = lanes[lane]
        ax.broken_barh(spans, (r + off, h), facecolors=COLOURS.get(kind, "#55A868"), edgecolor="white",
                       linewidth=0.3)
    ax.set_yticks([i + 0.5 for i in range(len(devices))])
    ax.set_yticklabels([f"{d} s{res.work[d].stage}" + (f" x{len(res.work[d].mates)}" if len(res.work[d].mates) > 1
                                                      else "") for d in devices], fontsize=7)
    ax.set_ylim(len(devices), 0)
    ax.set_xlabel(f"time ({unit})")
    opts = res.options
    ax.set_title(f"{res.plan.model} on {res.cluster.name}: {res.plan.schedule}, {res.plan.grad_sync}; "
                 f"{report.iteration_time_s:.4g} s/iteration (contention {'on' if opts.contention else 'off'}, "
                 f"overlap {'on' if opts.overlap else 'off'})", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=n) for n, c in COLOURS.items()], loc="upper center", fontsize=7,
              ncol=5, bbox_to_anchor=(0.5, -0.6 / (0.9 + 0.42 * len(devices))), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def utilisation(report: "SimReport", path, max_devices: int = 64) -> None:
    """Per simulated device: compute, exposed communication and idle shares of the step."""
    plt = _pyplot()
    res = report.result
    devices = list(res.work)[:max_devices]
    it = report.iteration_time_s
    comp = [100 * min(1.0, report.devices[d]["busy_s"] / it) for d in devices]
    comm = [100 * min(1.0 - c / 100, report.devices[d]["exposed_comm_s"] / it) for d, c in zip(devices, comp)]
    idle = [max(0.0, 100 - a - b) for a, b in zip(comp, comm)]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(devices) + 2), 4))
    x = range(len(devices))
    ax.bar(x, comp, color=COLOURS["F"], label="compute")
    ax.bar(x, comm, bottom=comp, color=COLOURS["allreduce"], label="exposed communication")
    ax.bar(x, idle, bottom=[a + b for a, b in zip(comp, comm)], color="#DDDDDD", label="idle")
    ax.set_xticks(list(x))
    ax.set_xticklabels(devices, rotation=90, fontsize=7)
    ax.set_ylabel("% of the iteration")
    ax.set_ylim(0, 100)
    ax.set_title(f"Device utilisation — bubble {100 * report.bubble_fraction:.1f}%, "
                 f"MFU {100 * report.mfu:.1f}%", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def scenario_bars(rows: list[dict[str, Any]], path, title: str = "What-if scenarios") -> None:
    """Simulated iteration time per scenario: old plan and re-planned side by side."""
    plt = _pyplot()
    import numpy as np
    names = [r["scenario"] for r in rows]
    old = [r.get("old_plan_s") or 0.0 for r in rows]
    new = [r.get("replan_s") or 0.0 for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.2))
    ax.bar(x - 0.2, old, 0.4, label="old plan", color=COLOURS["F"])
    ax.bar(x + 0.2, new, 0.4, label="re-planned", color=COLOURS["B"])
    for xi, (o, n) in enumerate(zip(old, new)):
        if o == 0.0:
            ax.text(xi - 0.2, 0, "invalid", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("simulated iteration time (s)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def sweep_lines(knob: str, values: list[float], series: dict[str, list[float | None]], path,
                unit: str = "", log_x: bool = True) -> None:
    """Iteration time against a swept knob, one line per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(values, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if log_x and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"{knob}{f' ({unit})' if unit else ''}")
    ax.set_ylabel("simulated iteration time (s)")
    ax.set_title(f"Sweep over {knob}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
