"""``hetalloc demo``: plan a model on the built-in 16-GPU lab cluster, simulate the plan,
and (``run=True``) close the loop on this machine (workflows.loop).

Writes plan.json, trace.json and gantt.png into the output directory and prints to the
console it is given. Never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

import hetalloc
from allocator import make_plan
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model
from hetalloc.plan import Plan
from hetalloc.plan_view import print_plan
from simulator import simulate

from .loop import closed_loop

BUILTIN_CLUSTER = Path(hetalloc.__file__).parent / "data" / "lab-16.yaml"
"""The 16-GPU lab cluster (8xA100-40G + 8xV100-16G) shipped with hetalloc."""


def demo(out_dir: str | Path, con: Console, *, model: str = "gpt2-xl", global_batch: int = 64,
         time_limit: float = 30.0, run: bool = False) -> Plan:
    """Plan, print, simulate (and with run, the closed loop); returns the plan."""
    out = Path(out_dir)  # created by the first file written: a bad argument leaves no empty folder
    cluster = load_cluster(BUILTIN_CLUSTER)
    cg = analytic_cost_graph(get_model(model))
    con.print(f"[bold]hetalloc demo[/bold]: {cluster.describe()}; model {model}, "
              f"global batch {global_batch}, seq {cg.seq_len}")
    plan = make_plan(cluster, cg, global_batch, time_limit=time_limit,
                     progress=lambda s: con.print(f"[dim]{s}[/dim]", highlight=False))
    plan.save(out / "plan.json")
    print_plan(plan, cluster, con)
    con.print(f"wrote {out / 'plan.json'}")
    rep = simulate(plan, cluster, cg)
    rep.write_trace(out / "trace.json")
    rep.write_gantt(out / "gantt.png")
    con.print(f"simulated   {rep.iteration_time_s:.4f} s/iteration with link sharing and overlap "
              f"(formula: {plan.predicted['iteration_time_s']:.4f} s); trace {out / 'trace.json'} "
              f"(open in ui.perfetto.dev), Gantt chart {out / 'gantt.png'}", highlight=False)
    if run:
        closed_loop(out / "loop", console=con)
    return plan
