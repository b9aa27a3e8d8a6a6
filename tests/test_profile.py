"""``hetalloc profile`` for real (torchrun, 2 gloo ranks, rank 1 slowed 2x): the files it
writes are what the planner reads, they round-trip, and they plan; the measurements
are the ones promised (per-layer times per micro-batch size with their spread, saved
activations from saved-tensor hooks, links, the slowed rank as its own type)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hetalloc.calibrate import load_efficiency
from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.costgraph import analytic_cost_graph, cost_graph_from_dict, load_cost_graph
from hetalloc.models import get_model
from hetalloc.plan import load_plan, validate_plan
from hetalloc.errors import SpecError
from runtime.profile.command import run_profile
from runtime.profile.files import report_lines

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BATCHES = [1, 2, 4]


@pytest.fixture(scope="module")
def prof(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    report = run_profile(out, nproc=2, model="gpt2-tiny", seq=32, batch_sizes="1,2,4", slowdown=["1=2"],
                         warmup=2, repeats=5, link_repeats=8, calibrate_fit=True, timeout_s=240)
    return out, report


def test_writes_the_planner_formats_with_measured_tables(prof):
    out, report = prof
    cg = load_cost_graph(out / "cost_graph.json")
    cluster = load_cluster(out / "cluster.yaml")
    assert cg.model == "gpt2-tiny" and cg.seq_len == 32 and cg.num_layers == 6
    fast = report["ranks"][0]["type"]
    slow = report["ranks"][1]["type"]
    assert slow == f"{fast}-slow2x" and set(cg.tables) == {fast, slow}
    assert sorted(d.type for d in cluster.devices) == sorted([fast, slow])
    for name, table in cg.tables.items():
        assert table.source == "measured" and table.batch_sizes == BATCHES
        assert all(t > 0 for row in table.fwd_s + table.bwd_s for t in row)
        assert {"fwd_iqr_rel", "bwd_iqr_rel"} <= set(table.meta)  # the spread is recorded
        # the backward from cold caches is measured too, never below the warm one
        assert table.bwd_cold_s is not None and all(c >= w > 0 for cr, wr in zip(table.bwd_cold_s, table.bwd_s)
                                                    for c, w in zip(cr, wr))
    # The slowed rank is slowed as the runtime slows it: whole passes take about twice as
    # long. How close to 2 the ratio must be follows from the profile's own spread of
    # whole passes (its quartiles, at the largest micro-batch), widened by 25 %: the
    # ratio of medians lies between the ratios of the quartiles.
    passes = {r["type"]: r["passes"][-1] for r in report["ranks"]}
    assert passes[fast]["batch_size"] == BATCHES[-1]
    lo = passes[slow]["p25"] / passes[fast]["p75"]
    hi = passes[slow]["p75"] / passes[fast]["p25"]
    assert lo / 1.25 <= 2.0 <= hi * 1.25, (lo, hi)
    total = {n: sum(t.fwd_s[i][-1] + t.bwd_s[i][-1] for i in range(6)) for n, t in cg.tables.items()}
    assert lo / 1.25 <= total[slow] / total[fast] <= hi * 1.25
    # Where that spread is wide, the profile says so itself: a whole-pass spread beyond
    # its limit marks it as too noisy to trust (and the printed report warns).
    noise = report["noise_check"]
    assert isinstance(noise["trusted"], bool)
    spread = max(p["iqr_rel"] for r in report["ranks"] for p in r["passes"])
    assert noise["trusted"] == (spread <= noise["limit"] and all(
        abs(p["drift_rel"]) <= noise["limit"] for r in report["ranks"] for p in r["passes"]))
    if hi / lo > (1 + noise["limit"]) ** 2:
        assert not noise["trusted"] and "too noisy" in "\n".join(report_lines(report, cg))
    # Links were measured and fitted.
    p2p = report["links"]["p2p_intra"]
    assert p2p["fit"]["bandwidth_gbps"] > 0 and p2p["fit"]["latency_us"] > 0 and len(p2p["bytes"]) >= 6
    assert report["links"]["allreduce_intra"]["fit"]["bandwidth_gbps"] > 0
    assert cluster.nodes[0].intra.bandwidth_bytes_per_s == pytest.approx(p2p["fit"]["bandwidth_gbps"] * 1e9,
                                                                              rel=1e-4)


def test_collectives_interference_and_compute_slots_are_measured(prof):
    out, report = prof
    cluster = load_cluster(out / "cluster.yaml")
    # every collective the cost formulas read, at every size of the sweep, among the 2 ranks
    ops = {(c.op, c.scope, c.ranks) for c in cluster.collectives}
    assert ops == {(op, "intra", 2) for op in ("allreduce", "reduce_scatter", "all_gather", "broadcast", "reduce")}
    for c in cluster.collectives:
        assert len(c.bytes) == 8 and c.bytes[0] == 8 and c.bytes[-1] == 16 << 20
        assert all(a <= b for a, b in zip(c.seconds, c.seconds[1:])) and c.seconds[0] > 0
        assert c.seconds[-1] > 2 * c.seconds[0]  # 16 MiB takes longer than 8 bytes
        assert c.link == cluster.nodes[0].intra.name and c.bandwidth_gbps > 0
    # the formulas read them: a 1 MiB ring all-reduce among the two devices is the table's
    from hetalloc.evaluate import allreduce_time
    ar = next(c for c in cluster.collectives if c.op == "allreduce")
    ids = [d.id for d in cluster.devices]
    assert allreduce_time(cluster, ids, 1 << 20, "ring") == pytest.approx(ar.seconds[5])
    # interference: a matmul alone and beside each stream, per rank; the types carry the median
    for r in report["ranks"]:
        i = r["interference"]
        assert i["matmul_alone_s"] > 0 and {"collective", "p2p"} <= set(i)
        for kind in ("collective", "p2p"):
            assert i[kind]["matmuls"] >= 10 and i[kind]["slowdown"] >= 0
        t = cluster.device_types[r["type"]]
        assert t.interference_collective == pytest.approx(i["collective"]["slowdown"], rel=1e-2, abs=1e-3)
        assert t.interference_p2p == pytest.approx(i["p2p"]["slowdown"], rel=1e-2, abs=1e-3)
        assert t.comm_slowdown_collective == pytest.approx(i["collective"]["stream_slowdown"], rel=1e-2, abs=1e-3)
        assert t.comm_slowdown_p2p == pytest.approx(i["p2p"]["stream_slowdown"], rel=1e-2, abs=1e-3)
    # the host's compute slots (its usable cores) are written with the node
    import os
    assert cluster.nodes[0].compute_slots == len(os.sched_getaffinity(0))


def test_runtime_overheads_are_measured_and_written(prof):
    out, report = prof
    oh = report["runtime_overhead"]
    cluster = load_cluster(out / "cluster.yaml")
    assert set(oh["per_type"]) == {d.type for d in cluster.devices}
    for name, f in oh["per_type"].items():
        t = cluster.device_types[name]
        assert t.op_overhead_us == pytest.approx(f["op_overhead_us"], abs=0.06)
        assert t.step_overhead_us == pytest.approx(f["step_overhead_us"], abs=0.06)
        # a runtime op costs something beyond its layers; bounded well below a whole step
        assert 0 < t.op_overhead_us < 5000 and 0 <= t.step_overhead_us < 20000
    for M in map(str, oh["microbatches"]):  # each rank's mean 'other' time of both runs
        assert set(oh["other_s"][M]) == {d.id for d in cluster.devices}
    # fitted again from the runs the profile left (what sim_accuracy --resimulate --refit
    # does), from the cluster file with its figures in: the same figures
    from runtime.profile.overhead import refit_overheads
    again = refit_overheads(out / "overhead", cluster, load_cost_graph(out / "cost_graph.json"))
    assert again["per_type"].keys() == oh["per_type"].keys()
    for name, f in oh["per_type"].items():
        g = dict(again["per_type"][name])
        assert g.pop("compute_quantiles") == f["compute_quantiles"]
        assert g == pytest.approx({k: v for k, v in f.items() if k != "compute_quantiles"}, rel=1e-9, abs=1e-9)
        # the measured distribution of a rank's own compute variation: 21 levels, ascending
        q = cluster.device_types[name].compute_quantiles
        assert len(q) == 21 and list(q) == sorted(q) and q[0] <= 0 <= q[-1]


def test_saved_activations_are_measured_with_hooks(prof):
    out, report = prof
    for layer in report["layers"]:
        by_batch = layer["saved_bytes_by_batch"]
        assert set(by_batch) == {"1", "4"}  # smallest and largest micro-batch
        if layer["kind"] == "block":
            # Measured, not copied from the formulas: close to them but not equal.
            assert by_batch["4"] > by_batch["1"] > 0
            assert 0.5 < layer["saved_act_bytes"] / layer["saved_act_bytes_analytic"] < 2.0
    cg = load_cost_graph(out / "cost_graph.json")
    assert [l.saved_act_bytes for l in cg.layers] == [l["saved_act_bytes"] for l in report["layers"]]
    assert [l.params for l in cg.layers] == [l.params for l in analytic_cost_graph(get_model("gpt2-tiny"), 32,
                                                                                     "fp32").layers]


def test_profile_files_round_trip_and_plan(prof, tmp_path):
    from allocator import make_plan

    out, _ = prof
    raw = json.loads((out / "cost_graph.json").read_text())
    cg = cost_graph_from_dict(raw)
    assert cg.to_dict() == raw  # read back exactly what was written
    cluster = load_cluster(out / "cluster.yaml")
    assert cluster_from_dict(yaml.safe_load(yaml.safe_dump(cluster.to_dict()))).to_dict() == cluster.to_dict()
    # Between and beyond the measured sizes times are interpolated and extrapolated.
    dt = cluster.dtype(cluster.devices[0].id)
    f2, _ = cg.layer_times(dt, 2)
    f3, _ = cg.layer_times(dt, 3)
    f4, _ = cg.layer_times(dt, 4)
    f6, _ = cg.layer_times(dt, 6)
    assert all(a <= b <= c <= d for a, b, c, d in zip(f2, f3, f4, f6))
    plan = make_plan(cluster, cg, 8, time_limit=10)
    validate_plan(plan, cluster, cg)
    # The slow device gets less work than the fast one.
    shares = {g.lead: g.share * (s.stop - s.start) for r in plan.replicas for s in r.stages for g in s.groups}
    fast, slow = (d.id for d in cluster.devices)
    assert shares.get(slow, 0) < shares[fast]
    # The command line plans from the same files.
    plan_path = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "hetalloc.cli", "plan", "--cluster", str(out / "cluster.yaml"),
                           "--cost-graph", str(out / "cost_graph.json"), "--model", "gpt2-tiny", "--global-batch", "8",
                           "--time-limit", "10", "-o", str(plan_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = load_plan(plan_path)
    validate_plan(again, cluster, cg)
    assert again.predicted["iteration_time_s"] == pytest.approx(plan.predicted["iteration_time_s"], rel=1e-9)


def test_calibration_is_written_and_reusable(prof):
    out, report = prof
    eff = load_efficiency(out / "efficiency.json")
    assert set(eff) == set(load_cost_graph(out / "cost_graph.json").tables)
    for kinds in eff.values():
        assert set(kinds) == {"embedding", "block", "head"}
    check = report["calibration"]["check"]
    assert check["points"] == 2 * len(BATCHES) and check["median_rel_error"] < 0.5
    # Reused for a model and a cluster that were not profiled: gpt2-small on the 4-CPU
    # example cluster, the fitted factors of this machine's CPU mapped onto its 'CPU' type.
    fitted = report["ranks"][0]["type"]
    args = [sys.executable, "-m", "hetalloc.cli", "plan", "--cluster", str(ROOT / "examples" / "cpu-4.yaml"),
            "--model", "gpt2-small", "--seq", "64", "--precision", "fp32", "--global-batch", "8", "--time-limit", "10",
            "--json"]
    mapped = subprocess.run(args + ["--efficiency", str(out / "efficiency.json"), "--efficiency-as", f"{fitted}=CPU"],
                            capture_output=True, text=True, timeout=120)
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert mapped.returncode == 0 and plain.returncode == 0, mapped.stderr + plain.stderr
    t_mapped = json.loads(mapped.stdout)["predicted"]["iteration_time_s"]
    t_plain = json.loads(plain.stdout)["predicted"]["iteration_time_s"]
    assert t_mapped != pytest.approx(t_plain, rel=1e-3)  # the factors changed the estimates
    bad = subprocess.run(args + ["--efficiency", str(out / "efficiency.json"), "--efficiency-as", "H100=CPU"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--efficiency-as" in bad.stderr and fitted in bad.stderr


def test_bad_profile_request_names_the_argument_before_launching(tmp_path):
    """Refused in the launching process (SpecError, one line), no rank started."""
    out = tmp_path / "profile"
    for kw, flag in ((dict(slowdown=["5=2"]), "--slowdown: 5: is not a rank of this profile"),
                     (dict(batch_sizes="1,x"), "--batch-sizes"), (dict(seq=4096), "--seq"),
                     (dict(model="gpt9"), "--model")):
        args = dict(nproc=2, model="gpt2-tiny", seq=32, batch_sizes="1", warmup=1, repeats=1, link_repeats=1) | kw
        with pytest.raises(SpecError, match=flag):
            run_profile(out, timeout_s=120, **args)
    assert not out.exists()


def test_closed_loop_prints_predicted_next_to_measured(tmp_path):
    """What 'hetalloc demo --run' does: profile (rank 1 slowed 2x), plan, simulate, run the
    planner's plan and the even split, one table of predicted vs measured."""
    from rich.console import Console

    from workflows.loop import closed_loop

    console = Console(record=True, width=160)
    result = closed_loop(tmp_path, console, seq=32, global_batch=8, steps=5, time_limit=5)
    text = console.export_text()
    assert "predicted (simulated) vs measured" in text and "planner" in text and "even" in text
    by = {r["name"]: r for r in result["rows"]}
    assert set(by) == {"planner", "even"}
    for row in by.values():
        assert row["predicted_s"] > 0 and row["measured_s"] > 0
        assert row["error"] == pytest.approx((row["predicted_s"] - row["measured_s"]) / row["measured_s"])
        for s in row["per_stage"]:
            assert s["measured"]["compute_s"] > 0 and s["predicted"]["compute_s"] > 0
    assert json.loads((tmp_path / "loop.json").read_text())["rows"][0]["name"] == "planner"
