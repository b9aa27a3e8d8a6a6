"""Calibration: the analytic model's parameters fitted from measurements.

Two fits, both relative least squares (every measurement counts by its relative error,
so a 50 µs layer weighs as much as a 50 ms one):

- **Efficiency** per (device type, layer kind) from a measured cost graph, so a user who
  profiled a few devices can plan models and clusters they have not measured (the fitted
  factors load back with ``load_efficiency`` into ``CostGraph.with_efficiency``). The
  analytic model (``hetalloc.costgraph``) for one layer at b samples of s tokens is
      fwd = overhead + max(t_c, t_m),  bwd = overhead + max(2 t_c, 2 t_m),
      t_c = flops_b / (peak * compute * tokens / (tokens + tokens_half)),
      t_m = bytes_b / (mem_bw * memory).
  Layer kinds that do arithmetic (flops > 0) are fitted on the compute branch: for a
  fixed tokens_half both times are linear in (overhead, 1 / compute), so the fit is a
  two-unknown linear least squares inside a one-dimensional search over tokens_half.
  Kinds without FLOPs (embeddings) are fitted on the memory branch, linear in
  (overhead, 1 / memory). A kind's other efficiency keeps the default: it is not
  identifiable from its own measurements. A kind whose times do not grow with its work
  (too little of it to rise above the noise) gets its fixed cost only: branch 'overhead'.
- **Links** (``fit_link``): latency and bandwidth from timed transfers, for p2p
  (t = latency + bytes / bandwidth) or ring all-reduce over n ranks
  (t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth), the formulas of hetalloc.costs;
  ``fit_collective`` does the same for any collective (``hetalloc.costs.collective_time``).

Pure Python and numpy: never imports torch (profiles are measured in runtime/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import DeviceType
from .costgraph import DEFAULT_EFFICIENCY, CostGraph, Efficiency
from .costs import collective_multipliers
from .errors import SpecError
from .fileio import atomic_write_json, read_json

SCHEMA_VERSION = 1
TOKENS_HALF_GRID = np.concatenate([[0.0], np.geomspace(1.0, 1e6, 121)])
"""Candidates for tokens_half (tokens), searched exhaustively: the fit is cheap."""


# ---- the fitting primitive -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AffineFit:
    """t ≈ intercept + slope * x, fitted on relative errors, both coefficients >= 0."""

    intercept: float
    slope: float
    rms_rel_error: float
    max_rel_error: float

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_affine(x: list[float] | np.ndarray, t: list[float] | np.ndarray) -> AffineFit:
    """Minimise sum(((a + b x - t) / t)^2) over a, b >= 0 (a is dropped when it would be
    negative, b when it would be). Needs positive times."""
    x, t = np.asarray(x, float), np.asarray(t, float)
    if len(t) == 0 or np.any(t <= 0):
        raise ValueError("fit_affine needs at least one positive time")
    w = 1.0 / t
    best = None
    for cols in (("a", "b"), ("b",), ("a",)):
        A = np.stack([np.ones_like(x) if c == "a" else x for c in cols], axis=1) * w[:, None]
        coef, *_ = np.linalg.lstsq(A, t * w, rcond=None)
        if np.any(coef < 0):
            continue
        a = float(coef[cols.index("a")]) if "a" in cols else 0.0
        b = float(coef[cols.index("b")]) if "b" in cols else 0.0
        rel = (a + b * x - t) / t
        cand = AffineFit(a, b, float(np.sqrt(np.mean(rel ** 2))), float(np.max(np.abs(rel))))
        if best is None or cand.rms_rel_error < best.rms_rel_error - 1e-12:
            best = cand
        if len(cols) == 2:
            break  # the unconstrained fit is feasible: it is the optimum
    assert best is not None  # ("a",) alone is always feasible: a = weighted mean of t
    return best


# ---- links ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LinkFit:
    bandwidth_gbps: float
    latency_us: float
    rms_rel_error: float
    max_rel_error: float

    def to_dict(self) -> dict[str, float]:
        return {"bandwidth_gbps": self.bandwidth_gbps, "latency_us": self.latency_us,
                "rms_rel_error": self.rms_rel_error, "max_rel_error": self.max_rel_error}


def fit_link(sizes_bytes: list[float], times_s: list[float], *, kind: str = "p2p", ranks: int = 2) -> LinkFit:
    """Latency and bandwidth that best explain timed transfers (module doc has the formulas)."""
    if kind == "p2p":
        lat_mult, byte_mult = 1.0, 1.0
    elif kind == "allreduce":
        if ranks < 2:
            raise ValueError("an all-reduce fit needs at least 2 ranks")
        lat_mult, byte_mult = 2.0 * (ranks - 1), 2.0 * (ranks - 1) / ranks
    else:
        raise ValueError(f"unknown link fit kind '{kind}'")
    f = fit_affine(np.asarray(sizes_bytes, float) * byte_mult, times_s)
    bw = 1.0 / f.slope if f.slope > 0 else math.inf
    return LinkFit(bw / 1e9, f.intercept / lat_mult * 1e6, f.rms_rel_error, f.max_rel_error)


def fit_collective(sizes_bytes: list[float], times_s: list[float], op: str, ranks: int) -> LinkFit:
    """Per-hop latency and bandwidth that best explain a collective's timed sizes under
    ``hetalloc.costs.collective_multipliers`` (relative least squares)."""
    lat_mult, byte_mult = collective_multipliers(op, ranks)
    if lat_mult <= 0:
        raise ValueError("a collective fit needs at least 2 ranks")
    f = fit_affine(np.asarray(sizes_bytes, float) * byte_mult, times_s)
    bw = 1.0 / f.slope if f.slope > 0 else math.inf
    return LinkFit(bw / 1e9, f.intercept / lat_mult * 1e6, f.rms_rel_error, f.max_rel_error)


# ---- efficiency ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EfficiencyFit:
    device_type: str
    kind: str
    efficiency: Efficiency
    branch: str
    """'compute' or 'memory': which branch of the roofline the kind was fitted on;
    'overhead' when its times did not grow with its work (fixed cost only)."""
    points: int
    rms_rel_error: float
    max_rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"device_type": self.device_type, "kind": self.kind, "branch": self.branch,
                "points": self.points, "rms_rel_error": self.rms_rel_error,
                "max_rel_error": self.max_rel_error, **self.efficiency.to_dict()}


def _points(cg: CostGraph, type_name: str, kind: str) -> list[tuple[int, int, float, float]]:
    """(layer index, batch, fwd s, bwd s) of every measured point of this kind."""
    t = cg.tables[type_name]
    return [(i, b, t.fwd_s[i][k], t.bwd_s[i][k]) for i, l in enumerate(cg.layers) if l.kind == kind
            for k, b in enumerate(t.batch_sizes)]


def fit_kind(cg: CostGraph, dtype: DeviceType, kind: str) -> EfficiencyFit:
    """Efficiency of one layer kind on one measured device type (module doc)."""
    pts = _points(cg, dtype.name, kind)
    if not pts:
        raise SpecError("cost graph", f"tables.{dtype.name}", f"has no '{kind}' layers", "profile the model first")
    layers = cg.layers
    times = np.array([p[2] for p in pts] + [p[3] for p in pts])
    mult = np.array([1.0] * len(pts) + [2.0] * len(pts))  # backward = twice the forward's work
    if any(layers[i].fwd_flops > 0 for i, *_ in pts):
        flops = np.array([layers[i].fwd_flops * b for i, b, *_ in pts] * 2)
        tokens = np.array([b * cg.seq_len for _, b, *_ in pts] * 2, float)
        best = None
        for th in TOKENS_HALF_GRID:
            # t = overhead + (1 / compute) * mult * flops * (tokens + th) / (tokens * peak)
            x = mult * flops * (tokens + th) / (tokens * dtype.peak_flops)
            f = fit_affine(x, times)
            if _grows(f, x, times) and (best is None or f.rms_rel_error < best[1].rms_rel_error - 1e-12):
                best = (th, f)
        if best is None:
            return _overhead_only(dtype, kind, times)
        th, f = best
        eff = Efficiency(compute=1.0 / f.slope, tokens_half=float(th), memory=DEFAULT_EFFICIENCY.memory,
                         overhead_s=f.intercept)
        branch = "compute"
    else:
        moved = np.array([layers[i].params * cg.act_bytes + 2 * layers[i].out_act_bytes * b
                          for i, b, *_ in pts] * 2)
        x = mult * moved / dtype.mem_bandwidth_bytes_per_s
        f = fit_affine(x, times)
        if not _grows(f, x, times):
            return _overhead_only(dtype, kind, times)
        eff = Efficiency(compute=DEFAULT_EFFICIENCY.compute, tokens_half=DEFAULT_EFFICIENCY.tokens_half,
                         memory=1.0 / f.slope, overhead_s=f.intercept)
        branch = "memory"
    return EfficiencyFit(dtype.name, kind, eff, branch, len(times), f.rms_rel_error, f.max_rel_error)


def _grows(f: AffineFit, x: np.ndarray, times: np.ndarray) -> bool:
    """Whether the work term explains at least 1 % of the largest measured time."""
    return f.slope > 0 and f.slope * float(np.max(x)) >= 0.01 * float(np.max(times))


def _overhead_only(dtype: DeviceType, kind: str, times: np.ndarray) -> EfficiencyFit:
    """A kind whose measured times do not grow with its work (too little work to see
    over the noise, e.g. embeddings at small micro-batches): its fixed cost is fitted
    (the mean, relatively weighted), its efficiencies keep the defaults; branch
    'overhead' says so in the file and the report."""
    f = fit_affine(np.zeros_like(times), times)
    eff = Efficiency(compute=DEFAULT_EFFICIENCY.compute, tokens_half=DEFAULT_EFFICIENCY.tokens_half,
                     memory=DEFAULT_EFFICIENCY.memory, overhead_s=f.intercept)
    return EfficiencyFit(dtype.name, kind, eff, "overhead", len(times), f.rms_rel_error, f.max_rel_error)


def calibrate(cg: CostGraph, device_types: dict[str, DeviceType]) -> list[EfficiencyFit]:
    """Fit every (measured device type, layer kind) of a measured cost graph.

    device_types: the types by name (a profiled cluster's ``device_types``); every
    measured table needs its type there (peak FLOP/s and memory bandwidth are the
    references the efficiencies are fractions of)."""
    out = []
    kinds = list(dict.fromkeys(l.kind for l in cg.layers))
    for name in sorted(cg.tables):
        if name not in device_types:
            raise SpecError("cost graph", f"tables.{name}", "is a device type the cluster does not declare",
                            "pass the cluster spec written by the same profile")
        for kind in kinds:
            out.append(fit_kind(cg, device_types[name], kind))
    return out


def efficiency_map(fits: list[EfficiencyFit]) -> dict[str, dict[str, Efficiency]]:
    out: dict[str, dict[str, Efficiency]] = {}
    for f in fits:
        out.setdefault(f.device_type, {})[f.kind] = f.efficiency
    return out


def calibration_error(cg: CostGraph, device_types: dict[str, DeviceType],
                      eff: dict[str, dict[str, Efficiency]]) -> dict[str, float]:
    """How well the analytic model with `eff` reproduces a measured cost graph: relative
    error of whole-model forward+backward time per (device type, batch size)."""
    analytic = CostGraph(cg.model, cg.seq_len, cg.precision, cg.layers, family=cg.family,
                         model_spec=cg.model_spec).with_efficiency(eff)
    errs = []
    for name, t in sorted(cg.tables.items()):
        dt = device_types[name]
        for k, b in enumerate(t.batch_sizes):
            measured = sum(t.fwd_s[i][k] + t.bwd_s[i][k] for i in range(cg.num_layers))
            f, bw = analytic.layer_times(dt, b)
            errs.append(abs(float(f.sum() + bw.sum()) - measured) / measured)
    return {"median_rel_error": float(np.median(errs)), "max_rel_error": float(np.max(errs)), "points": len(errs)}


# ---- files ---------------------------------------------------------------------------------

def efficiency_to_dict(fits: list[EfficiencyFit], source: str = "", check: dict[str, float] | None = None) -> dict:
    eff = efficiency_map(fits)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "efficiency",
        "source": source,
        "efficiency": {t: {k: e.to_dict() for k, e in sorted(kinds.items())} for t, kinds in sorted(eff.items())},
        "fits": [f.to_dict() for f in fits],
        "check": check or {},
    }


def save_efficiency(path: str | Path, fits: list[EfficiencyFit], source: str = "",
                    check: dict[str, float] | None = None) -> None:
    atomic_write_json(path, efficiency_to_dict(fits, source, check))


def efficiency_from_dict(d: Any, source: str = "<efficiency>") -> dict[str, dict[str, Efficiency]]:
    if not isinstance(d, dict) or d.get("kind") != "efficiency":
        raise SpecError(source, "kind", "not an efficiency file", "pass a file written by 'hetalloc profile --calibrate'")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise SpecError(source, "schema_version", f"unsupported version {d.get('schema_version')!r}",
                        f"this hetalloc reads version {SCHEMA_VERSION}; re-run the calibration")
    out: dict[str, dict[str, Efficiency]] = {}
    for t, kinds in (d.get("efficiency") or {}).items():
        for k, e in kinds.items():
            try:
                eff = Efficiency(**e)
            except TypeError:
                raise SpecError(source, f"efficiency.{t}.{k}", "malformed factors",
                                "expected compute, tokens_half, memory, overhead_s") from None
            if not (eff.compute > 0 and eff.memory > 0 and eff.tokens_half >= 0 and eff.overhead_s >= 0):
                raise SpecError(source, f"efficiency.{t}.{k}", f"out of range: {eff}",
                                "compute and memory must be > 0, tokens_half and overhead_s >= 0")
            out.setdefault(t, {})[k] = eff
    return out


def load_efficiency(path: str | Path) -> dict[str, dict[str, Efficiency]]:
    """Fitted factors as ``CostGraph.with_efficiency`` takes them: {device type: {kind: Efficiency}}."""
    d = read_json(path, missing_fix="run 'hetalloc profile --calibrate' first")
    return efficiency_from_dict(d, str(path))
