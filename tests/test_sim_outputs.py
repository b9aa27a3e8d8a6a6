"""What the simulator writes: a Chrome trace that validates, non-empty PNGs, JSON
reports, and the simulate / whatif subcommands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allocator import baseline_plan
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.cli import build_parser
from hetalloc.errors import SpecError
from hetalloc.models import get_model
from hetalloc.plan import attach_context
from simulator import simulate
from simulator.plots import scenario_bars, sweep_lines

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab():
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"))
    plan = attach_context(baseline_plan("pipedream", cl, cg, 64), cl, cg)
    return plan, cl, cg


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_trace_is_valid_chrome_trace(lab, tmp_path):
    plan, cl, cg = lab
    rep = simulate(plan, cl, cg, iterations=2)
    rep.write_trace(tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    events = doc["traceEvents"]
    assert events
    for e in events:
        for key in ("ph", "ts", "dur", "pid", "tid"):
            assert key in e, (key, e)
        assert e["ph"] in ("X", "M", "C")
        assert e["dur"] >= 0 and e["ts"] >= 0
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sum(n.startswith("link ") for n in names) >= 2  # NICs carry the cross-node sends
    assert len(rep.result.work) == sum(not n.startswith("link ") for n in names)
    ops = [e for e in events if e["ph"] == "X" and e["cat"] in ("F", "B")]
    per_device = len(plan.replicas[0].stages[0].groups)
    assert len(ops) >= 2 * 2 * plan.num_microbatches * per_device  # two iterations of F and B
    end_us = max(e["ts"] + e["dur"] for e in events if e["ph"] == "X")
    assert end_us == pytest.approx(rep.iteration_ends_s[-1] * 1e6, rel=1e-6)


def test_pngs_are_written(lab, tmp_path):
    plan, cl, cg = lab
    rep = simulate(plan, cl, cg)
    rep.write_gantt(tmp_path / "g.png")
    rep.write_utilisation(tmp_path / "u.png")
    scenario_bars([{"scenario": "base", "old_plan_s": 1.0, "replan_s": None},
                   {"scenario": "fail a100/0", "old_plan_s": None, "replan_s": 1.2}], tmp_path / "w.png")
    sweep_lines("nic", [10, 100, 400], {"old plan": [3.0, 1.5, 1.2], "re-planned": [2.0, None, 1.1]},
                tmp_path / "s.png", "Gb/s")
    for name in ("g.png", "u.png", "w.png", "s.png"):
        assert_png(tmp_path / name)


def test_report_json_round_trips(lab, tmp_path):
    plan, cl, cg = lab
    rep = simulate(plan, cl, cg)
    rep.save(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["kind"] == "simulation" and d["schema_version"] == 1
    assert d["iteration_time_s"] == rep.iteration_time_s > 0
    assert set(d["devices"]) == set(plan.device_ids())
    assert 0 <= d["bubble_fraction"] < 1 and 0 < d["mfu"] < 1
    assert d["throughput_samples_per_s"] == pytest.approx(64 / rep.iteration_time_s)
    assert d["critical_path"]["segments"][0]["start_s"] == 0
    assert any(l["kind"].startswith("nic") for l in d["links"])


def _cli(argv: list[str]) -> int:
    """A subcommand's handler, errors raised (hetalloc.cli.main would print them)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_simulate_command(lab, tmp_path, capsys):
    plan, _cl, _cg = lab
    path = tmp_path / "plan.json"
    plan.save(path)
    rc = _cli(["simulate", str(path), "--trace", str(tmp_path / "t.json"), "--gantt", str(tmp_path / "g.png"),
               "--utilisation", str(tmp_path / "u.png"), "--iterations", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "iteration time" in out and "critical path" in out
    assert_png(tmp_path / "g.png")
    json.loads((tmp_path / "t.json").read_text())
    assert _cli(["simulate", str(path), "--json", "--no-contention", "--no-overlap"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["options"]["contention"] is False
    assert d["iteration_time_s"] == pytest.approx(plan.predicted["iteration_time_s"], rel=0.01)


def test_whatif_command(lab, tmp_path, capsys):
    plan, _cl, _cg = lab
    path = tmp_path / "plan.json"
    plan.save(path)
    rc = _cli(["whatif", str(path), "--fail", "a100/0", "--swap", "8xV100=4xH100", "--planner", "even",
               "--sweep", "nic=10,100Gb/s", "--chart", str(tmp_path / "c.png"), "--plot", str(tmp_path / "p.png"),
               "--json", "--steps", "1000", "--deadline", "10"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    rows = {r["scenario"]: r for r in d["rows"]}
    assert set(rows) == {"base", "swap 8xV100=4xH100", "fail a100/0", "nic=10Gb/s", "nic=100Gb/s"}
    assert rows["fail a100/0"]["old_plan_s"] is None and "a100/0" in rows["fail a100/0"]["old_plan_note"]
    assert rows["nic=10Gb/s"]["old_plan_s"] > rows["nic=100Gb/s"]["old_plan_s"]
    assert d["cheapest_meeting_deadline"] in rows
    assert_png(tmp_path / "c.png")
    assert_png(tmp_path / "p.png")
    with pytest.raises(SpecError, match="no scenario"):
        _cli(["whatif", str(path)])
