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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import DeviceType
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

    def __post_init__(self) -> None:
        order = sorted(range(len(self.batch_sizes)), key=lambda i: self.batch_sizes[i])
        self.batch_sizes = [int(self.batch_sizes[i]) for i in order]
        self.fwd_s = [_monotone([row[i] for i in order]) for row in self.fwd_s]
        self.bwd_s = [_monotone([row[i] for i in order]) for row in self.bwd_s]

    def at(self, layer: int, batch: float) -> tuple[float, float]:
        return (_interp(self.batch_sizes, self.fwd_s[layer], batch),
                _interp(self.batch_sizes, self.bwd_s[layer], batch))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "batch_sizes": self.batch_sizes,
                "fwd_s": self.fwd_s, "bwd_s": self.bwd_s, "meta": self.meta}


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
        return sum(l.params for l in self.layers[start:stop])

    @property
    def total_params(self) -> int:
        return self.params(0, self.num_layers)

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

    def layer_times(self, dtype: DeviceType, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Forward and backward seconds of every layer on dtype for `batch` samples."""
        key = ("lt", dtype, batch)
        hit = self._cache.get(key)
        if hit is None:
            if batch <= 0:
                z = np.zeros(self.num_layers)
                hit = (z, z)
            elif dtype.name in self.tables:
                t = self.tables[dtype.name]
                pairs = [t.at(i, batch) for i in range(self.num_layers)]
                hit = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
            else:
                pairs = [self._analytic(l, dtype, batch) for l in self.layers]
                hit = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
            self._cache[key] = hit
        return hit

    def prefix_times(self, dtype: DeviceType, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative sums (length L+1) of forward and backward times, for range sums."""
        key = ("px", dtype, batch)
        hit = self._cache.get(key)
        if hit is None:
            f, b = self.layer_times(dtype, batch)
            hit = (np.concatenate([[0.0], np.cumsum(f)]), np.concatenate([[0.0], np.cumsum(b)]))
            self._cache[key] = hit
        return hit

    def range_time(self, start: int, stop: int, dtype: DeviceType, batch: int) -> tuple[float, float]:
        """Forward and backward seconds of a stage holding layers [start, stop) on dtype for
        `batch` samples: its layers' times plus, per op, the runtime's own time on the
        device (``DeviceType.op_overhead_us``; 0 unmeasured)."""
        pf, pb = self.prefix_times(dtype, batch)
        o = dtype.op_overhead_s
        return float(pf[stop] - pf[start]) + o, float(pb[stop] - pb[start]) + o

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
            "layers": [asdict(l) for l in self.layers],
            "tables": {k: v.to_dict() for k, v in sorted(self.tables.items())},
            "efficiency": {t: {k: e.to_dict() for k, e in sorted(kinds.items())}
                           for t, kinds in sorted(self.efficiency.items())},
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def with_tables(self, tables: dict[str, TimeTable]) -> "CostGraph":
        return replace(self, tables={**self.tables, **tables}, _cache={})

    def with_efficiency(self, eff: dict[str, dict[str, Efficiency]]) -> "CostGraph":
        merged = {k: dict(v) for k, v in self.efficiency.items()}
        for t, kinds in eff.items():
            merged.setdefault(t, {}).update(kinds)
        return replace(self, efficiency=merged, _cache={})


def analytic_cost_graph(shape: TransformerShape, seq_len: int | None = None,
                        precision: str = "bf16-mixed") -> CostGraph:
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
        n = len(layers)
        tables = {}
        for k, t in d.get("tables", {}).items():
            if len(t["fwd_s"]) != n or len(t["bwd_s"]) != n:
                raise SpecError(source, f"tables.{k}", f"has {len(t['fwd_s'])} layers, the model has {n}",
                                "re-profile this device type")
            if any(len(row) != len(t["batch_sizes"]) for row in t["fwd_s"] + t["bwd_s"]):
                raise SpecError(source, f"tables.{k}.fwd_s", "rows do not match batch_sizes",
                                "every layer needs one time per batch size")
            tables[k] = TimeTable(t["batch_sizes"], t["fwd_s"], t["bwd_s"], t.get("source", "measured"),
                                  t.get("meta", {}))
        eff = {t: {kind: Efficiency(**e) for kind, e in kinds.items()}
               for t, kinds in d.get("efficiency", {}).items()}
        return CostGraph(d["model"], int(d["seq_len"]), d["precision"], layers, tables, eff,
                         d.get("family", "gpt"), d.get("model_spec"))
    except (KeyError, TypeError) as e:
        raise SpecError(source, str(e), "missing or malformed field", "re-run 'hetalloc profile'") from None


def load_cost_graph(path: str | Path) -> CostGraph:
    return cost_graph_from_dict(read_json(path, missing_fix="check the path"), str(path))
