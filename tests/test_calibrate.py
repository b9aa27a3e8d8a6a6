"""Calibration (hetalloc.calibrate): fits recover the parameters that generated the data,
fitted factors are written, read back and used to plan a model and a cluster that were
never measured, and bad efficiency files are refused with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetalloc.calibrate import (calibrate, calibration_error, efficiency_map, fit_affine, fit_link,
                                load_efficiency, save_efficiency)
from hetalloc.catalog import DeviceType
from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import CostGraph, Efficiency, TimeTable, analytic_cost_graph
from hetalloc.errors import SpecError
from hetalloc.models import get_model

CPU = DeviceType(name="Test-CPU", vendor="cpu", peak_tflops=0.1, memory_gib=8.0, mem_bandwidth_gbps=10.0)
BATCHES = [1, 2, 4, 8, 16]


def test_fit_affine_recovers_a_line_and_drops_a_negative_intercept():
    x = np.array([1.0, 2.0, 5.0, 10.0])
    f = fit_affine(x, 3e-5 + 2e-6 * x)
    assert f.intercept == pytest.approx(3e-5, rel=1e-9) and f.slope == pytest.approx(2e-6, rel=1e-9)
    assert f.rms_rel_error < 1e-12
    g = fit_affine(x, 2e-6 * x - 1e-7)  # best line has a negative intercept: refit through 0
    assert g.intercept == 0.0 and g.slope > 0
    with pytest.raises(ValueError):
        fit_affine([1.0], [0.0])


def test_fit_link_inverts_the_cost_formulas():
    sizes = [4, 4096, 65536, 1 << 20, 4 << 20]
    lat, bw = 40e-6, 5e9
    p2p = fit_link(sizes, [lat + n / bw for n in sizes])
    assert p2p.latency_us == pytest.approx(40.0, rel=1e-6) and p2p.bandwidth_gbps == pytest.approx(5.0, rel=1e-6)
    n = 4  # ring all-reduce: 2(n-1) latencies, 2(n-1)/n of the bytes
    ar = fit_link(sizes, [2 * (n - 1) * lat + 2 * (n - 1) / n * s / bw for s in sizes], kind="allreduce", ranks=n)
    assert ar.latency_us == pytest.approx(40.0, rel=1e-6) and ar.bandwidth_gbps == pytest.approx(5.0, rel=1e-6)


def _synthetic_measured(truth: dict[str, Efficiency]) -> CostGraph:
    """A 'measured' cost graph whose tables are the analytic model's times with `truth`."""
    cg = analytic_cost_graph(get_model("gpt2-tiny"), 64, precision="fp32")
    gen = cg.with_efficiency({CPU.name: truth})
    fwd = np.stack([gen.layer_times(CPU, b)[0] for b in BATCHES], axis=1)
    bwd = np.stack([gen.layer_times(CPU, b)[1] for b in BATCHES], axis=1)
    return cg.with_tables({CPU.name: TimeTable(BATCHES, fwd.tolist(), bwd.tolist())})


def test_calibration_recovers_the_efficiencies_that_made_the_times():
    truth = {"block": Efficiency(compute=0.42, tokens_half=0.0, overhead_s=120e-6),
             "head": Efficiency(compute=0.35, tokens_half=0.0, overhead_s=15e-6),
             "embedding": Efficiency(memory=0.9, overhead_s=30e-6)}
    measured = _synthetic_measured(truth)
    fits = {(f.device_type, f.kind): f for f in calibrate(measured, {CPU.name: CPU})}
    assert set(fits) == {(CPU.name, k) for k in ("embedding", "block", "head")}
    for kind in ("block", "head"):
        got = fits[(CPU.name, kind)]
        assert got.branch == "compute" and got.rms_rel_error < 1e-9
        assert got.efficiency.compute == pytest.approx(truth[kind].compute, rel=1e-6)
        assert got.efficiency.overhead_s == pytest.approx(truth[kind].overhead_s, rel=1e-6)
    emb = fits[(CPU.name, "embedding")]
    assert emb.branch == "memory" and emb.efficiency.memory == pytest.approx(0.9, rel=1e-6)
    check = calibration_error(measured, {CPU.name: CPU}, efficiency_map(list(fits.values())))
    assert check["max_rel_error"] < 1e-6 and check["points"] == len(BATCHES)


def test_fitted_factors_round_trip_and_plan_an_unmeasured_model_and_cluster(tmp_path):
    from allocator import make_plan

    truth = {"block": Efficiency(compute=0.5, tokens_half=0.0, overhead_s=100e-6),
             "head": Efficiency(compute=0.4, tokens_half=0.0, overhead_s=10e-6),
             "embedding": Efficiency(memory=0.8, overhead_s=20e-6)}
    fits = calibrate(_synthetic_measured(truth), {CPU.name: CPU})
    path = tmp_path / "efficiency.json"
    save_efficiency(path, fits, source="synthetic")
    eff = load_efficiency(path)
    assert eff == efficiency_map(fits)
    # A bigger model of the same layer kinds, on a 6-device two-node cluster of the type.
    cluster = cluster_from_dict({
        "name": "not-measured",
        "device_types": [{"name": CPU.name, "vendor": "cpu", "peak_tflops": CPU.peak_tflops,
                          "memory_gib": CPU.memory_gib, "mem_bandwidth_gbps": CPU.mem_bandwidth_gbps}],
        "nodes": [{"name": f"n{i}", "gpus": [{"type": CPU.name, "count": 3}],
                   "intra_link": {"bandwidth_gbps": 5.0, "latency_us": 40}, "nic": "Eth-10G"} for i in range(2)]})
    cg = analytic_cost_graph(get_model("gpt2-small"), 128, precision="fp32").with_efficiency(eff)
    block = next(l for l in cg.layers if l.kind == "block")
    f, _ = cg.layer_times(CPU, 4)
    i = cg.layers.index(block)
    assert f[i] == pytest.approx(100e-6 + block.fwd_flops * 4 / (CPU.peak_flops * 0.5), rel=1e-9)
    plan = make_plan(cluster, cg, 24, time_limit=10)
    assert plan.solver["status"] in ("optimal", "feasible", "time_limit") and plan.predicted["iteration_time_s"] > 0


def test_a_kind_whose_times_do_not_grow_gets_its_fixed_cost_only():
    measured = _synthetic_measured({"block": Efficiency(compute=0.5, tokens_half=0.0)})
    t = measured.tables[CPU.name]

    def flat(rows):
        return [[40e-6] * len(BATCHES) if l.kind == "embedding" else row for l, row in zip(measured.layers, rows)]

    measured = measured.with_tables({CPU.name: TimeTable(BATCHES, flat(t.fwd_s), flat(t.bwd_s))})
    emb = next(f for f in calibrate(measured, {CPU.name: CPU}) if f.kind == "embedding")
    assert emb.branch == "overhead" and emb.efficiency.memory == Efficiency().memory
    assert 0 < emb.efficiency.overhead_s < 1e-3


@pytest.mark.parametrize("doc, field", [
    ({"kind": "cost_graph"}, "kind"),
    ({"kind": "efficiency", "schema_version": 99}, "schema_version"),
    ({"kind": "efficiency", "schema_version": 1, "efficiency": {"T": {"block": {"compute": -1.0}}}}, "efficiency.T.block"),
    ({"kind": "efficiency", "schema_version": 1, "efficiency": {"T": {"block": {"speed": 1.0}}}}, "efficiency.T.block"),
])
def test_bad_efficiency_files_name_the_field(tmp_path, doc, field):
    p = tmp_path / "eff.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(SpecError) as e:
        load_efficiency(p)
    assert str(p) in str(e.value) and field in str(e.value)
    with pytest.raises(SpecError, match="not found"):
        load_efficiency(tmp_path / "missing.json")
