"""A shared host's compute efficiency fitted to a run of every rank at once
(workflows.hostfit): on a run whose steps took what the simulation gives at a known
efficiency, the fit finds it. No torch, no run: the run's metrics are written here."""

from __future__ import annotations

import json

import pytest

from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.models import LayerShape
from runtime.plans import hand_plan
from runtime.profile.files import write_cluster
from runtime.profile.overhead import MICROBATCHES, TOGETHER, WARMUP_STEPS
from workflows.hostfit import fit_efficiency, simulated_step_s, with_efficiency


def profile(tmp_path, slots: int):
    """A profile folder: 3 devices on one node with `slots` compute slots, 3 layers
    (forward 1 ms, backward 2 ms), and the calibration pipeline's plan."""
    c = cluster_from_dict({"name": "toy", "device_types": [{"name": "X", "peak_tflops": 1, "memory_gib": 100,
                                                            "mem_bandwidth_gbps": 32}],
                           "nodes": [{"name": "n", "gpus": [{"type": "X", "count": 3}], "compute_slots": slots,
                                      "intra_link": {"bandwidth_gbps": 1.0, "latency_us": 10.0}}]})
    layers = [LayerShape(f"l{i}", "block", 0, 1.0, 1e5, 1e6) for i in range(3)]
    cg = CostGraph("toy", 1, "fp32", layers, tables={"X": TimeTable([1, 2], [[1e-3, 2e-3]] * 3, [[2e-3, 4e-3]] * 3)})
    write_cluster(tmp_path, c)
    cg.save(tmp_path / "cost_graph.json")
    plan = hand_plan(c, cg, [[((k, k + 1), [(f"n/{k}", 2)]) for k in range(3)]], num_microbatches=MICROBATCHES[-1])
    tag = f"m{MICROBATCHES[-1]}{TOGETHER}"
    (tmp_path / "overhead").mkdir()
    plan.save(tmp_path / "overhead" / f"plan-{tag}.json")
    return c, cg, plan, tmp_path / "overhead" / f"run-{tag}"


def write_run(run_dir, step_s: float, steps: int = 10) -> None:
    run_dir.mkdir()
    recs = [{"step": k, "step_time_s": 10 * step_s if k <= WARMUP_STEPS else step_s} for k in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_the_fit_finds_the_efficiency_the_run_ran_at_and_writes_it(tmp_path):
    c, cg, plan, run_dir = profile(tmp_path, slots=2)
    target = simulated_step_s(plan, with_efficiency(c, 0.7), cg)
    assert target > simulated_step_s(plan, c, cg)
    write_run(run_dir, target)
    fit = fit_efficiency(tmp_path, apply=True)
    assert fit["share_efficiency"] == pytest.approx(0.7, abs=0.005)
    assert fit["simulated_s"] == pytest.approx(target, rel=0.003)
    from hetalloc.cluster import load_cluster
    assert load_cluster(tmp_path / "cluster.yaml").nodes[0].share_efficiency == fit["share_efficiency"]
    assert json.loads((tmp_path / "share_efficiency.json").read_text()) == fit


def test_a_fit_to_a_profile_other_processes_disturbed_is_reported_not_applied(tmp_path):
    c, cg, plan, run_dir = profile(tmp_path, slots=2)
    write_run(run_dir, simulated_step_s(plan, with_efficiency(c, 0.7), cg))
    fit = fit_efficiency(tmp_path, foreign_share=0.3, apply=True)
    assert not fit["applied"] and fit["share_efficiency"] == 1.0 and fit["fitted"] == pytest.approx(0.7, abs=0.005)
    from hetalloc.cluster import load_cluster
    assert load_cluster(tmp_path / "cluster.yaml").nodes[0].share_efficiency == 1.0


def test_full_speed_where_the_simulation_is_already_as_slow_and_nothing_where_nothing_is_shared(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    c, cg, plan, run_dir = profile(tmp_path / "a", slots=2)
    write_run(run_dir, 0.5 * simulated_step_s(plan, c, cg))
    assert fit_efficiency(tmp_path / "a", apply=True)["share_efficiency"] == 1.0
    c, cg, plan, run_dir = profile(tmp_path / "b", slots=0)
    write_run(run_dir, 2 * simulated_step_s(plan, c, cg))
    assert fit_efficiency(tmp_path / "b") is None


def test_by_default_the_fit_is_reported_not_applied(tmp_path):
    c, cg, plan, run_dir = profile(tmp_path, slots=2)
    write_run(run_dir, simulated_step_s(plan, with_efficiency(c, 0.7), cg))
    fit = fit_efficiency(tmp_path)
    assert not fit["applied"] and fit["share_efficiency"] == 1.0 and fit["fitted"] == pytest.approx(0.7, abs=0.005)
    from hetalloc.cluster import load_cluster
    assert load_cluster(tmp_path / "cluster.yaml").nodes[0].share_efficiency == 1.0
