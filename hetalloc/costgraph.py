"""Cost graph: a model as layers with sizes, and per device type forward/backward times.

Times come from one of two sources per device type:
- **measured** tables (from ``hetalloc profile``): per layer, forward and backward seconds
  at a few micro-batch sizes. Between measured sizes the time is interpolated linearly;
  below the smallest it scales proportionally (t1 * b / b1); above the largest it grows
  linearly with the slope of the last measured segment (never negative). Tables are made
  monotone in the batch size (running maximum) so a larger share is never faster.
- **analytic** estimates when no table exists for the type: a roofline with
  efficiencies, t = overhead + max(FLOPs / (peak * e_c(tokens)), bytes / (mem_bw * e_m)),
  where e_c(tokens) = compute * tokens / (tokens + tokens_half) models the lower
  utilisation of small micro-batches. Backward FLOPs and bytes are twice the forward.

Tensor parallelism (``tp`` > 1 devices serving a layer together): every layer that is
split (it has tensor-parallel all-reduces) runs at ``hetalloc.costs.tp_layer_time`` of its one-device time, with a
per-(type, t) efficiency from ``tp_efficiency`` (by type, then '*') or the catalog's
``DEFAULT_TP_EFFICIENCY``; the analytic model keeps its per-layer launch time whole.
Full recomputation adds the recomputed layers' forward to the backward
(``hetalloc.costs.recompute_backward_time``). Communication is not in these times:
``tp_allreduces`` says what a layer range all-reduces, ``hetalloc.costs.tp_comm_time``
prices it on a link.

Default efficiencies (``DEFAULT_EFFICIENCY``): blocks and heads reach 55 % of peak at large
batch (well-tuned Megatron-LM on A100 reports 50-57 % MFU), half of that at 512 tokens
per share; memory-bound parts reach 70 % of memory bandwidth; each layer pays 20 µs of
kernel launches per pass. Calibration (``hetalloc profile --calibrate``) replaces them
per device type and layer kind.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import DEFAULT_TP_EFFICIENCY, DeviceType
from .costs import (RECOMPUTE, TP_DEGREES, layer_saved_bytes, recompute_backward_time, tp_layer_time,
                    tp_share)
from .errors import SpecError
from .fileio import atomic_write_json, read_json
from .models import LayerShape, TransformerShape, get_model, layer_shapes, shape_from_dict

SCHEMA_VERSION = 1
PRECISIONS = {"bf16-mixed": 2, "fp32": 4}


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Parameters of the analytic time model for one device type and layer kind."""

    compute: float = 0.55
    """Fraction of peak FLOP/s reached at large micro-batches."""
    tokens_half: float = 512.0
    """Tokens per share at which compute efficiency is half of ``compute``."""
    memory: float = 0.70
    """Fraction of memory bandwidth reached by memory-bound work."""
    overhead_s: float = 20e-6
    """Fixed cost per layer per pass (kernel launches), seconds."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_EFFICIENCY = Efficiency()


@dataclass
class TimeTable:
    """Measured forward/backward seconds per layer at some micro-batch sizes."""

    batch_sizes: list[int]
    fwd_s: list[list[float]]
    """fwd_s[layer][i] = seconds for batch_sizes[i] samples."""
    bwd_s: list[list[float]]
    source: str = "measured"
    meta: dict[str, Any] = field(default_factory=dict)
    bwd_cold_s: list[list[float]] | None = None
    """The backward from cold caches (the profile flushes the device's last-level cache
    between a pass's forward and its backward): what a backward costs when other work
    ran between it and its own forward (``hetalloc.schedule.warm_backward``), its saved
    activations no longer cached. Never below ``bwd_s``. None: not measured (the warm
    times stand for it)."""

    def __post_init__(self) -> None:
        order = sorted(range(len(self.batch_sizes)), key=lambda i: self.batch_sizes[i])
        self.batch_sizes = [int(self.batch_sizes[i]) for i in order]
        self.fwd_s = [_monotone([row[i] for i in order]) for row in self.fwd_s]
        self.bwd_s = [_monotone([row[i] for i in order]) for row in self.bwd_s]
        if self.bwd_cold_s is not None:
            self.bwd_cold_s = [[max(c, w) for c, w in zip(_monotone([row[i] for i in order]), warm)]
                               for row, warm in zip(self.bwd_cold_s, self.bwd_s)]

    def at(self, layer: int, batch: float, cold: bool = False) -> tuple[float, float]:
        """(forward, backward) seconds of a layer for `batch` samples; with `cold`, the
        backward from cold caches (the warm one where it was not measured)."""
        bwd = self.bwd_cold_s if cold and self.bwd_cold_s is not None else self.bwd_s
        return (_interp(self.batch_sizes, self.fwd_s[layer], batch),
                _interp(self.batch_sizes, bwd[layer], batch))

    def scaled(self, factor: float, source: str) -> "TimeTable":
        """Every time x factor (a device that much slower or faster)."""
        def mul(rows):
            return [[x * factor for x in row] for row in rows]
        return TimeTable(list(self.batch_sizes), mul(self.fwd_s), mul(self.bwd_s), source,
                         bwd_cold_s=None if self.bwd_cold_s is None else mul(self.bwd_cold_s))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "batch_sizes": self.batch_sizes,
                "fwd_s": self.fwd_s, "bwd_s": self.bwd_s,
                # written only when measured, so that tables without it keep their fingerprint
                **({"bwd_cold_s": self.bwd_cold_s} if self.bwd_cold_s is not None else {}),
                "meta": self.meta}


def _monotone(xs: list[float]) -> list[float]:
    out, m = [], 0.0
    for x in xs:
        m = max(m, float(x))
        out.append(m)
    return out


def _interp(bs: list[int], ts: list[float], b: float) -> float:
    if b <= 0:
        return 0.0
    if b <= bs[0]:
        return ts[0] * b / bs[0]
    if b >= bs[-1]:
        if len(bs) == 1:
            return ts[0] * b / bs[0]
        slope = max(0.0, (ts[-1] - ts[-2]) / (bs[-1] - bs[-2]))
        return ts[-1] + slope * (b - bs[-1])
    i = bisect.bisect_right(bs, b)
    b0, b1, t0, t1 = bs[i - 1], bs[i], ts[i - 1], ts[i]
    return t0 + (t1 - t0) * (b - b0) / (b1 - b0)


@dataclass
class CostGraph:
    """A model as a chain of layers with sizes and times per device type."""

    model: str
    seq_len: int
    precision: str
    layers: list[LayerShape]
    tables: dict[str, TimeTable] = field(default_factory=dict)
    efficiency: dict[str, dict[str, Efficiency]] = field(default_factory=dict)
    """Overrides of the analytic model: efficiency[type or '*'][kind]."""
    family: str = "gpt"
    model_spec: dict[str, Any] | None = None
    """The model the layers describe (``TransformerShape.to_dict()``, with its Hugging Face
    config when it came from one), so plans and profiles made from this cost graph say
    what to build without the model's file."""
    tp_efficiency: dict[str, dict[int, float]] = field(default_factory=dict)
    """Overrides of the catalog's ``DEFAULT_TP_EFFICIENCY``: tp_efficiency[type or '*'][t]."""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SpecError("cost graph", "precision", f"unknown precision '{self.precision}'",
                            f"use one of {', '.join(PRECISIONS)}")

    def shape(self, source: str = "cost graph") -> TransformerShape:
        """The model these layers describe: the recorded model_spec, or (for cost graphs
        written before it was recorded) the built-in model of that name."""
        if self.model_spec is not None:
            return shape_from_dict(self.model_spec, source)
        try:
            return get_model(self.model)
        except SpecError:
            raise SpecError(source, "model_spec", f"does not record model '{self.model}'",
                            "re-run 'hetalloc plan' (or 'hetalloc profile') with this hetalloc, or pass --model") from None

    # ---- sizes --------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def act_bytes(self) -> int:
        return PRECISIONS[self.precision]

    def params(self, start: int, stop: int) -> int:
        px = self._cache.get("params_px")
        if px is None:
            px = self._cache["params_px"] = [0, *np.cumsum([l.params for l in self.layers], dtype=object).tolist()]
        return px[stop] - px[start]

    @property
    def total_params(self) -> int:
        return self.params(0, self.num_layers)

    @property
    def supports_tp(self) -> bool:
        """Do the layers say how they split (cost graphs written before plan schema 2 do not)?"""
        return any(l.tp_allreduces_fwd or l.tp_allreduces_bwd for l in self.layers)

    def range_params(self, start: int, stop: int, tp: int = 1) -> float:
        """Parameters one tensor-parallel rank of `tp` holds of layers [start, stop)."""
        if tp == 1:
            return float(self.params(start, stop))
        return sum(tp_share(l.params, l.replicated_params, tp) for l in self.layers[start:stop])

    def range_saved_bytes(self, start: int, stop: int, tp: int = 1, recompute: str = "none") -> float:
        """Bytes per sample that layers [start, stop) keep per micro-batch in flight on one
        rank (``hetalloc.costs.layer_saved_bytes``)."""
        if tp == 1 and recompute == "none":
            return float(sum(l.saved_act_bytes for l in self.layers[start:stop]))
        return sum(layer_saved_bytes(l.saved_act_bytes, l.replicated_act_bytes, l.checkpoint_bytes, tp, recompute)
                   for l in self.layers[start:stop])

    def range_working_bytes(self, start: int, stop: int, tp: int = 1, recompute: str = "none") -> float:
        """Bytes per sample rebuilt at a time in the backward: with full recomputation the
        largest recomputed layer's saved activations on one rank (what it would keep
        without recomputation); 0 without recomputation."""
        if recompute != "full":
            return 0.0
        return max((layer_saved_bytes(l.saved_act_bytes, l.replicated_act_bytes, 0.0, tp, "none")
                    for l in self.layers[start:stop] if l.checkpoint_bytes > 0), default=0.0)

    def tp_allreduces(self, start: int, stop: int, recompute: str = "none") -> tuple[int, float, int, float]:
        """What a tensor-parallel group serving layers [start, stop) all-reduces per sample
        of its share: (all-reduces in the forward, their bytes in total, all-reduces in the
        backward, their bytes). With full recomputation the backward also repeats the
        recomputed layers' forward all-reduces."""
        nf = nb = 0
        bf = bb = 0.0
        for l in self.layers[start:stop]:
            nf += l.tp_allreduces_fwd
            bf += l.tp_allreduces_fwd * l.tp_allreduce_bytes
            nb += l.tp_allreduces_bwd
            bb += l.tp_allreduces_bwd * l.tp_allreduce_bytes
            if recompute == "full" and l.checkpoint_bytes > 0:
                nb += l.tp_allreduces_fwd
                bb += l.tp_allreduces_fwd * l.tp_allreduce_bytes
        return nf, bf, nb, bb

    def fwd_flops_per_sample(self, start: int = 0, stop: int | None = None) -> float:
        return sum(l.fwd_flops for l in self.layers[start:stop])

    def train_flops_per_sample(self) -> float:
        """Model FLOPs of one training sample (forward + backward = 3x forward)."""
        return 3.0 * self.fwd_flops_per_sample()

    # ---- times --------------------------------------------------------------------
    def eff(self, dtype: DeviceType, kind: str) -> Efficiency:
        for key in (dtype.name, "*"):
            e = self.efficiency.get(key, {}).get(kind)
            if e is not None:
                return e
        return DEFAULT_EFFICIENCY

    def tp_eff(self, dtype: DeviceType, tp: int) -> float:
        """Efficiency of a layer split over `tp` devices of dtype (see module doc)."""
        if tp == 1:
            return 1.0
        for key in (dtype.name, "*"):
            e = self.tp_efficiency.get(key, {}).get(tp)
            if e is not None:
                return e
        return DEFAULT_TP_EFFICIENCY[tp]

    def source_of(self, dtype: DeviceType) -> str:
        return self.tables[dtype.name].source if dtype.name in self.tables else "analytic"

    def _analytic(self, layer: LayerShape, dtype: DeviceType, batch: float) -> tuple[float, float]:
        e = self.eff(dtype, layer.kind)
        tokens = batch * self.seq_len
        flops = layer.fwd_flops * batch
        # Bytes a pass moves: its weights once, its input and output activations.
        weight_bytes = layer.params * self.act_bytes
        moved = weight_bytes + 2 * layer.out_act_bytes * batch
        ce = e.compute * tokens / (tokens + e.tokens_half)
        t_c = flops / (dtype.peak_flops * ce) if flops > 0 else 0.0
        t_m = moved / (dtype.mem_bandwidth_bytes_per_s * e.memory)
        fwd = e.overhead_s + max(t_c, t_m)
        bwd = e.overhead_s + max(2 * t_c, 2 * t_m)
        return fwd, bwd

    def layer_times(self, dtype: DeviceType, batch: int, tp: int = 1,
                    cold: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Forward and backward seconds of every layer on dtype for `batch` samples, the
        layer split over `tp` devices of that type (each rank's time); with `cold`, the
        backward from cold caches where the table has it (``TimeTable.bwd_cold_s``)."""
        key = ("lt", dtype, batch, tp, cold)
        hit = self._cache.get(key)
        if hit is None and tp != 1:
            if tp not in TP_DEGREES:
                raise ValueError(f"tensor-parallel degree {tp} is not one of {TP_DEGREES}")
            f1, b1 = self.layer_times(dtype, batch, cold=cold)
            e = self.tp_eff(dtype, tp)
            analytic = dtype.name not in self.tables
            f, b = f1.copy(), b1.copy()
            for i, l in enumerate(self.layers):
                if l.tp_allreduces_fwd or l.tp_allreduces_bwd:  # split (its parts are all-reduced); else whole
                    fixed = self.eff(dtype, l.kind).overhead_s if analytic and batch > 0 else 0.0
                    f[i] = tp_layer_time(float(f1[i]), tp, e, fixed)
                    b[i] = tp_layer_time(float(b1[i]), tp, e, fixed)
            hit = self._cache[key] = (f, b)
        if hit is None:
            if batch <= 0:
                z = np.zeros(self.num_layers)
                hit = (z, z)
            elif dtype.name in self.tables:
                t = self.tables[dtype.name]
                pairs = [t.at(i, batch, cold) for i in range(self.num_layers)]
                hit = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
            else:
                pairs = [self._analytic(l, dtype, batch) for l in self.layers]
                hit = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
            self._cache[key] = hit
        return hit

    def prefix_times(self, dtype: DeviceType, batch: int, tp: int = 1,
                     cold: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative sums (length L+1) of forward and backward times, for range sums."""
        key = ("px", dtype, batch, tp, cold)
        hit = self._cache.get(key)
        if hit is None:
            f, b = self.layer_times(dtype, batch, tp, cold)
            hit = (np.concatenate([[0.0], np.cumsum(f)]), np.concatenate([[0.0], np.cumsum(b)]))
            self._cache[key] = hit
        return hit

    def range_time(self, start: int, stop: int, dtype: DeviceType, batch: int, tp: int = 1,
                   recompute: str = "none", cold: bool = False) -> tuple[float, float]:
        """Forward and backward compute seconds of a stage holding layers [start, stop) on
        dtype for `batch` samples, split over `tp` devices (each rank's time), with
        `recompute` ('none' | 'full'): its layers' times plus, per op, the runtime's own
        time on the device (``DeviceType.op_overhead_us``; 0 unmeasured). With `cold`, the
        backward of a micro-batch whose forward was not the op just before it
        (``hetalloc.schedule.warm_backward``): from cold caches where the profile measured
        it. The tensor-parallel all-reduces are not included (``tp_allreduces``)."""
        pf, pb = self.prefix_times(dtype, batch, tp, cold)
        o = dtype.op_overhead_s
        fwd = float(pf[stop] - pf[start])
        bwd = float(pb[stop] - pb[start])
        if recompute == "full":
            f, _ = self.layer_times(dtype, batch, tp)
            again = sum(float(f[i]) for i in range(start, stop) if self.layers[i].checkpoint_bytes > 0)
            bwd = recompute_backward_time(again, bwd)
        elif recompute not in RECOMPUTE:
            raise ValueError(f"unknown recompute '{recompute}'; use one of {', '.join(RECOMPUTE)}")
        return fwd + o, bwd + o

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "cost_graph",
            "model": self.model,
            "family": self.family,
            **({"model_spec": self.model_spec} if self.model_spec is not None else {}),
            "seq_len": self.seq_len,
            "precision": self.precision,
            "layers": [_layer_dict(l) for l in self.layers],
            "tables": {k: v.to_dict() for k, v in sorted(self.tables.items())},
            "efficiency": {t: {k: e.to_dict() for k, e in sorted(kinds.items())}
                           for t, kinds in sorted(self.efficiency.items())},
            # written only when set, so that graphs without it keep their fingerprint
            **({"tp_efficiency": {t: {str(k): e for k, e in sorted(by.items())}
                                  for t, by in sorted(self.tp_efficiency.items())}}
               if self.tp_efficiency else {}),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def with_tables(self, tables: dict[str, TimeTable]) -> "CostGraph":
        return replace(self, tables={**self.tables, **tables}, _cache={})

    def with_tp_efficiency(self, eff: dict[str, dict[int, float]]) -> "CostGraph":
        merged = {k: dict(v) for k, v in self.tp_efficiency.items()}
        for t, by in eff.items():
            merged.setdefault(t, {}).update(by)
        return replace(self, tp_efficiency=merged, _cache={})

    def with_efficiency(self, eff: dict[str, dict[str, Efficiency]]) -> "CostGraph":
        merged = {k: dict(v) for k, v in self.efficiency.items()}
        for t, kinds in eff.items():
            merged.setdefault(t, {}).update(kinds)
        return replace(self, efficiency=merged, _cache={})


_LAYER_DEFAULTS = {f.name: f.default for f in fields(LayerShape) if f.default is not MISSING}


def _layer_dict(l: LayerShape) -> dict[str, Any]:
    """A layer as JSON, leaving out fields at their default (a graph written before they
    existed serialises, and fingerprints, as before)."""
    return {k: v for k, v in asdict(l).items() if k not in _LAYER_DEFAULTS or v != _LAYER_DEFAULTS[k]}


def analytic_cost_graph(shape: TransformerShape, seq_len: int | None = None,
                        precision: str = "bf16-mixed") -> CostGraph:
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise SpecError("--seq", "", f"must be a whole number >= 1, got {seq_len!r}",
                        "give the sequence length in tokens, or leave it out for the model's context")
    seq = seq_len or shape.max_seq
    if precision not in PRECISIONS:
        raise SpecError("--precision", "", f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    return CostGraph(shape.name, seq, precision, layer_shapes(shape, seq, PRECISIONS[precision]),
                     family=shape.family, model_spec=shape.to_dict())


def cost_graph_from_dict(d: dict[str, Any], source: str = "<cost graph>") -> CostGraph:
    if not isinstance(d, dict) or d.get("kind") != "cost_graph":
        raise SpecError(source, "kind", "not a cost graph file", "pass a file written by 'hetalloc profile'")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise SpecError(source, "schema_version", f"unsupported version {d.get('schema_version')!r}",
                        f"this hetalloc reads version {SCHEMA_VERSION}; re-run 'hetalloc profile'")
    try:
        layers = [LayerShape(**l) for l in d["layers"]]
        check_layers(layers, source)
        seq = d["seq_len"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise SpecError(source, "seq_len", f"must be a whole number >= 1, got {seq!r}", "re-run 'hetalloc profile'")
        if d["precision"] not in PRECISIONS:
            raise SpecError(source, "precision", f"unknown precision {d['precision']!r}",
                            f"use one of {', '.join(PRECISIONS)}")
        n = len(layers)
        tables = {}
        for k, t in d.get("tables", {}).items():
            check_table(t, f"tables.{k}", source)
            if len(t["fwd_s"]) != n or len(t["bwd_s"]) != n:
                raise SpecError(source, f"tables.{k}", f"has {len(t['fwd_s'])} layers, the model has {n}",
                                "re-profile this device type")
            if any(len(row) != len(t["batch_sizes"]) for row in t["fwd_s"] + t["bwd_s"]):
                raise SpecError(source, f"tables.{k}.fwd_s", "rows do not match batch_sizes",
                                "every layer needs one time per batch size")
            cold = t.get("bwd_cold_s")
            if cold is not None and (len(cold) != n or any(len(row) != len(t["batch_sizes"]) for row in cold)):
                raise SpecError(source, f"tables.{k}.bwd_cold_s", "rows do not match the layers and batch_sizes",
                                "every layer needs one time per batch size; re-profile this device type")
            tables[k] = TimeTable(t["batch_sizes"], t["fwd_s"], t["bwd_s"], t.get("source", "measured"),
                                  t.get("meta", {}), cold)
        eff = {t: {kind: Efficiency(**e) for kind, e in kinds.items()}
               for t, kinds in d.get("efficiency", {}).items()}
        tp_eff = {}
        for t, by in d.get("tp_efficiency", {}).items():
            tp_eff[t] = {}
            for k, e in by.items():
                if not k.isdigit() or int(k) not in TP_DEGREES or not isinstance(e, (int, float)) or not e > 0:
                    raise SpecError(source, f"tp_efficiency.{t}.{k}", f"expected a degree in {TP_DEGREES} "
                                    f"and an efficiency > 0, got {k!r}: {e!r}", "fix or re-profile")
                tp_eff[t][int(k)] = float(e)
        return CostGraph(d["model"], int(d["seq_len"]), d["precision"], layers, tables, eff,
                         d.get("family", "gpt"), model_spec=d.get("model_spec"), tp_efficiency=tp_eff)
    except (KeyError, TypeError, AttributeError) as e:
        raise SpecError(source, str(e), "missing or malformed field", "re-run 'hetalloc profile'") from None


def _bad_number(v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True
    return (integer and not isinstance(v, int)) or not np.isfinite(v) or v < 0


def check_layers(layers: list[LayerShape], source: str) -> None:
    """Sizes that a cost graph's layers must have: at least one layer; parameters a whole
    number >= 0; FLOPs and activation bytes finite and >= 0 (SpecError naming the field)."""
    if not layers:
        raise SpecError(source, "layers", "the cost graph has no layers", "re-run 'hetalloc profile'")
    for i, layer in enumerate(layers):
        for name in ("params", "fwd_flops", "out_act_bytes", "saved_act_bytes"):
            v = getattr(layer, name)
            if _bad_number(v, integer=name == "params"):
                what = "a whole number >= 0" if name == "params" else "a finite number >= 0"
                raise SpecError(source, f"layers[{i}].{name}", f"must be {what}, got {v!r}",
                                "re-run 'hetalloc profile' (or fix the layer by hand)")


def check_table(t: Any, path: str, source: str) -> None:
    """A measured time table: batch sizes whole numbers >= 1, times finite and >= 0."""
    if not isinstance(t, dict):
        raise SpecError(source, path, "expected {batch_sizes, fwd_s, bwd_s}", "re-profile this device type")
    sizes = t["batch_sizes"]
    if not isinstance(sizes, list) or not sizes or any(_bad_number(b, True) or b < 1 for b in sizes):
        raise SpecError(source, f"{path}.batch_sizes", f"must be a non-empty list of whole numbers >= 1, got {sizes!r}",
                        "re-profile this device type")
    for key in ("fwd_s", "bwd_s", "bwd_cold_s"):
        if key == "bwd_cold_s" and t.get(key) is None:
            continue
        rows = t[key]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise SpecError(source, f"{path}.{key}", "expected one list of seconds per layer", "re-profile")
        for i, row in enumerate(rows):
            if any(_bad_number(x, False) for x in row):
                raise SpecError(source, f"{path}.{key}[{i}]", f"times must be finite seconds >= 0, got {row!r}",
                                "re-profile this device type")


def load_cost_graph(path: str | Path) -> CostGraph:
    return cost_graph_from_dict(read_json(path, missing_fix="check the path"), str(path))
