"""Tables that tell the truth: the plan table pairs every device type with its own share
(not types sorted beside shares in plan order), and both the plan table and the
simulator's stage table name every replica a row stands for and count all its devices."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model
from hetalloc.plan_view import compact_ranges, stage_table
from runtime.plans import cpu_cost_graph, hand_plan
from simulator import simulate
from simulator.commands import stage_table as sim_stage_table

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def rows(table) -> list[list[str]]:
    con = Console(record=True, width=240, file=io.StringIO())
    con.print(table)
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in con.export_text().splitlines()
            if line.startswith("│")]


def test_compact_ranges():
    assert compact_ranges([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7-8"
    assert compact_ranges([4]) == "4"


def test_plan_table_pairs_each_type_with_its_share():
    # The slow device comes first in the plan: sorting types while printing shares in plan
    # order would show 'CPU, CPU-slow | 3:5' and give the fast CPU the 3.
    cl = load_cluster(EXAMPLES / "cpu-2-slow.yaml")
    plan = hand_plan(cl, cpu_cost_graph("gpt2-tiny", 32), [[((0, 6), [("host/1", 3), ("host/0", 5)])]],
                     num_microbatches=1)
    (row,) = rows(stage_table(plan, cl))
    assert row[3] == "CPU-slow:3 CPU:5"


@pytest.fixture(scope="module")
def lab_plan():
    """lab-16: four identical 2-stage replicas on the A100s, then two on the V100s whose
    stages are two devices wide; replica 6 mixes types with uneven shares."""
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt2-small"))
    reps = [[((0, 7), [(f"a100/{2 * k}", 2)]), ((7, 14), [(f"a100/{2 * k + 1}", 2)])] for k in range(3)]
    reps += [[((0, 7), [(f"v100/{4 * k}", 1), (f"v100/{4 * k + 1}", 1)]),
              ((7, 14), [(f"v100/{4 * k + 2}", 1), (f"v100/{4 * k + 3}", 1)])] for k in range(2)]
    reps += [[((0, 14), [("a100/6", 3), ("a100/7", 3)])]]
    return cl, cg, hand_plan(cl, cg, reps, num_microbatches=4)


def test_plan_table_names_every_identical_replica(lab_plan):
    cl, _, plan = lab_plan
    got = [(r[0], r[1], r[3]) for r in rows(stage_table(plan, cl))]
    assert got == [("0-2", "0", "A100-40G:2"), ("0-2", "1", "A100-40G:2"),
                   ("3-4", "0", "2xV100-16G:1"), ("3-4", "1", "2xV100-16G:1"),
                   ("5", "0", "2xA100-40G:3")]


def test_simulator_stage_table_names_every_folded_replica(lab_plan):
    cl, cg, plan = lab_plan
    rep = simulate(plan, cl, cg)
    assert rep.folding["simulated_pipelines"] < rep.folding["pipelines"]  # the simulation folded replicas
    got = [(r[0], r[1], int(r[3])) for r in rows(sim_stage_table(rep))]
    assert got == [("0-2", "0", 3), ("0-2", "1", 3), ("3-4", "0", 4), ("3-4", "1", 4), ("5", "0", 2)]
    assert sum(n for *_, n in got) == len(plan.device_ids())  # every device counted once


def test_plan_table_shows_tensor_parallel_groups_with_their_shares():
    from hetalloc.evaluate import predict
    from hetalloc.plan import Group, Plan, Replica, Stage, attach_context, validate_plan
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt2-small"))
    stage = Stage(0, 14, [Group([f"a100/{i}" for i in range(4)], 6), Group(["v100/0"], 2), Group(["v100/1"], 2)])
    plan = Plan(model=cg.model, seq_len=cg.seq_len, global_batch=20, num_microbatches=2, schedule="1f1b",
                grad_sync="ring", replicas=[Replica([stage])], precision=cg.precision)
    attach_context(plan, cl, cg)
    validate_plan(plan, cl, cg)
    plan.predicted = predict(plan, cl, cg).to_dict()
    (row,) = rows(stage_table(plan, cl))
    assert row[3] == "(4xA100-40G):6 2xV100-16G:2"
