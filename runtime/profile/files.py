"""What a profile becomes: the measured cost graph, the measured cluster spec and a report.

Input: every rank's measurements (runtime.profile.measure) and the link timings. Output, in the
formats the planner reads:
- ``cost_graph.json`` (``CostGraph.save``): the model's layers with measured parameter
  counts, saved-activation and output bytes (FLOPs stay the analytic formulas', the
  reference calibration is relative to), and one measured ``TimeTable`` per device type
  (ranks of one type are averaged);
- ``cluster.yaml`` (``dump_cluster_yaml``): one node per host (with its cores as compute
  slots for CPU ranks),
  device types declared inline with measured figures (peak: matmul throughput; memory
  bandwidth: what the optimizer step achieves, the figure ``hetalloc.costs.optimizer_time``
  divides by; interference: the median slowdown of its ranks' matmul beside
  communication, and of their communication streams beside the matmul), a rank slowed with --slowdown R=F as its own type
  ``<name>-slow<F>x``; intra-node and inter-node links with fitted bandwidth and
  latency; the measured collective tables (``hetalloc.collectives``);
- ``report.json``: every raw figure, the fits and their errors, and the profile's
  judgement of its own noise (``noise_check``).
Never imports torch.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetalloc.calibrate import fit_collective, fit_link
from hetalloc.catalog import DeviceType
from hetalloc.cluster import Cluster, LinkSpec, Node, Device, dump_cluster_yaml
from hetalloc.collectives import MeasuredCollective
from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.costs import param_bytes
from hetalloc.fileio import atomic_write_json, atomic_write_text
from hetalloc.models import LayerShape, TransformerShape, layer_shapes

REPORT_SCHEMA_VERSION = 1
NOISE_LIMIT = 0.10
"""A device type whose whole passes spread (interquartile range over median) more than
this, or drift between the first and second half of the repeats by more, is reported as
too noisy to trust (and so is a run-overhead fit whose two runs disagree by more)."""
PRECISION = "fp32"
"""The runtime trains in float32 (or float64 for checks); profiles are fp32."""


@dataclass
class ProfileArgs:
    model: str
    shape: TransformerShape
    seq_len: int
    batch_sizes: list[int]
    warmup: int
    repeats: int
    slowdown: dict[int, float] = field(default_factory=dict)
    torch_version: str = ""
    dtype: str = "float32"


def type_name(base: str, slowdown: float) -> str:
    return base if slowdown == 1.0 else f"{base}-slow{slowdown:g}x"


def node_name(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", host).strip("-") or "host"


def effective_memory_bandwidth_gbps(opt: dict[str, Any]) -> float:
    """Bandwidth that makes hetalloc.costs.optimizer_time equal the measured step."""
    return 2.0 * opt["params"] * param_bytes(PRECISION, opt["optimizer"]).total / opt["seconds"] / 1e9


def device_types(ranks: list[dict[str, Any]]) -> tuple[dict[str, DeviceType], list[str]]:
    """Measured device types, and the type of every rank."""
    names = [type_name(r["device_name"], r["slowdown"]) for r in ranks]
    out = {}
    for name in dict.fromkeys(names):
        mine = [r for r, n in zip(ranks, names) if n == name]
        interference, comm = {}, {}
        for kind in ("collective", "p2p"):
            runs = [r["interference"][kind] for r in mine if r.get("interference") and kind in r["interference"]]
            interference[kind] = float(f"{statistics.median(x['slowdown'] for x in runs):.3g}") if runs else 0.0
            comm[kind] = float(f"{statistics.median(x['stream_slowdown'] for x in runs):.3g}") if runs else 0.0
        out[name] = DeviceType(
            name=name, vendor=mine[0]["vendor"],
            peak_tflops=float(f"{statistics.median(r['peak_tflops'] for r in mine):.6g}"),
            memory_gib=float(f"{min(r['memory_gib'] for r in mine):.6g}"),
            mem_bandwidth_gbps=float(f"{statistics.median(effective_memory_bandwidth_gbps(r['optimizer']) for r in mine):.6g}"),
            cost_per_hour_usd=0.0, source="measured by hetalloc profile",
            interference_collective=interference["collective"], interference_p2p=interference["p2p"],
            comm_slowdown_collective=comm["collective"], comm_slowdown_p2p=comm["p2p"])
    return out, names


def time_table(ranks: list[dict[str, Any]], pa: ProfileArgs) -> TimeTable:
    """One type's table: the median of repeats on each rank, averaged over its ranks."""
    L = len(ranks[0]["sizes"])
    B = len(pa.batch_sizes)

    def avg(kind: str, stat: str) -> list[list[float]]:
        return [[statistics.fmean(r["layers"][kind][k][i][stat] for r in ranks) for k in range(B)] for i in range(L)]

    meta = {"statistic": "median of repeats, mean over ranks of the type", "warmup": pa.warmup,
            "repeats": pa.repeats, "ranks": [r["rank"] for r in ranks], "slowdown": ranks[0]["slowdown"],
            "threads": ranks[0]["threads"], "dtype": pa.dtype, "torch": pa.torch_version,
            "fwd_iqr_rel": avg("fwd", "iqr_rel"), "bwd_iqr_rel": avg("bwd", "iqr_rel")}
    cold = avg("bwd_cold", "median") if all(r["layers"].get("bwd_cold") for r in ranks) else None
    return TimeTable(list(pa.batch_sizes), avg("fwd", "median"), avg("bwd", "median"), "measured", meta, cold)


def measured_layers(ranks: list[dict[str, Any]], pa: ProfileArgs) -> list[LayerShape]:
    analytic = layer_shapes(pa.shape, pa.seq_len, 4)
    sizes = ranks[0]["sizes"]
    if len(sizes) != len(analytic):
        raise RuntimeError(f"the model has {len(sizes)} layers, the cost graph formulas {len(analytic)}")
    return [LayerShape(a.name, a.kind, int(s["params"]), a.fwd_flops, float(s["out_act_bytes"]),
                       float(s["saved_act_bytes"])) for a, s in zip(analytic, sizes)]


def _fit_rows(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """Median time per size over the rows (pairs or groups), and the fitted link."""
    if not rows:
        return None
    sizes = rows[0]["bytes"]
    times = [statistics.median(r["seconds"][k] for r in rows) for k in range(len(sizes))]
    ranks = len(rows[0]["ranks"])
    fit = fit_link(sizes, times, kind=kind, ranks=ranks)
    return {"bytes": sizes, "seconds": times, "ranks": ranks, "fit": fit.to_dict()}


def link_figures(links: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
    """Fitted p2p and all-reduce figures inside nodes and across them."""
    intra = [p for p in links["p2p"] if p["hosts"][0] == p["hosts"][1]]
    inter = [p for p in links["p2p"] if p["hosts"][0] != p["hosts"][1]]
    return {
        "p2p_intra": _fit_rows(intra, "p2p"),
        "p2p_inter": _fit_rows(inter, "p2p"),
        "allreduce_intra": _fit_rows([a for a in links["allreduce"] if a["scope"] == "intra"], "allreduce"),
        "allreduce_inter": _fit_rows([a for a in links["allreduce"] if a["scope"] == "inter"], "allreduce"),
        "collectives": collective_tables(links.get("collectives", [])),
    }


INTRA_LINK = "measured-p2p"
INTER_LINK = "measured-p2p-inter"


def collective_tables(tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The raw collective tables with their fitted per-hop figures."""
    out = []
    for t in tables:
        fit = fit_collective(t["bytes"], t["seconds"], t["op"], len(t["ranks"]))
        out.append({**t, "fit": fit.to_dict()})
    return out


def measured_collectives(tables: list[dict[str, Any]]) -> tuple[MeasuredCollective, ...]:
    """What cluster.yaml carries of the collective tables (hetalloc.collectives)."""
    out = []
    for t in tables:
        mono, top = [], 0.0
        for x in t["seconds"]:
            top = max(top, x)
            mono.append(float(f"{top:.6g}"))
        bw = t["fit"]["bandwidth_gbps"]
        out.append(MeasuredCollective(t["op"], t["scope"], len(t["ranks"]), tuple(float(b) for b in t["bytes"]),
                                      tuple(mono), float(f"{t['fit']['latency_us']:.6g}"),
                                      float(f"{min(bw, 1e6):.6g}"),
                                      INTRA_LINK if t["scope"] == "intra" else INTER_LINK))
    return tuple(out)


def noise_check(ranks: list[dict[str, Any]], rank_types: list[str]) -> dict[str, Any]:
    """The profile's judgement of its own figures: per device type the largest spread of
    whole passes (IQR over median) and the largest drift between the halves of the
    repeats over the micro-batch sizes, with the host's load average; 'trusted' is False
    (and 'why' says which) where either exceeds NOISE_LIMIT."""
    out: dict[str, Any] = {"limit": NOISE_LIMIT, "types": {}, "trusted": True, "why": []}
    for name in dict.fromkeys(rank_types):
        mine = [r for r, t in zip(ranks, rank_types) if t == name]
        passes = [p for r in mine for p in r["layers"].get("passes", [])]
        if not passes:
            continue
        spread = max(p["iqr_rel"] for p in passes)
        drift = max(abs(p["drift_rel"]) for p in passes)
        mm = [r["interference"]["matmul_alone_iqr_rel"] for r in mine if r.get("interference")]
        out["types"][name] = {"pass_spread_rel": spread, "pass_drift_rel": drift,
                              "matmul_spread_rel": max(mm) if mm else None,
                              "load_average": [r.get("load_average") for r in mine]}
        for what, v in (("whole passes spread", spread), ("repeats drifted", drift)):
            if v > NOISE_LIMIT:
                out["trusted"] = False
                out["why"].append(f"{name}: {what} {100 * v:.0f}% (limit {100 * NOISE_LIMIT:.0f}%)")
    return out


def _link(fitted: dict[str, Any] | None, name: str) -> LinkSpec | None:
    if fitted is None:
        return None
    f = fitted["fit"]
    return LinkSpec(float(f"{f['bandwidth_gbps']:.6g}") * 1e9, float(f"{f['latency_us']:.6g}") * 1e-6, name)


def measured_cluster(ranks: list[dict[str, Any]], types: dict[str, DeviceType], rank_types: list[str],
                     figures: dict[str, Any], name: str) -> Cluster:
    """One node per host, devices in rank order (device <host>/<k> is the host's k-th rank)."""
    hosts = list(dict.fromkeys(r["host"] for r in ranks))
    # A one-rank host has no measured intra link: it never uses one (a placeholder keeps the spec valid).
    intra = _link(figures["p2p_intra"], INTRA_LINK) or LinkSpec(1e9, 0.0, "unmeasured")
    nic = _link(figures["p2p_inter"], INTER_LINK)
    nodes = []
    for h in hosts:
        nn = node_name(h)
        mine = [(r, t) for r, t in zip(ranks, rank_types) if r["host"] == h]
        devs = [Device(f"{nn}/{k}", t, nn, k) for k, (_, t) in enumerate(mine)]
        # CPU ranks share the host's cores (and their communication runs on them): the
        # simulator needs the cores; GPUs are a device each (simulator.compute).
        slots = int(mine[0][0].get("compute_slots") or 0) if mine[0][0]["vendor"] == "cpu" else 0
        nodes.append(Node(nn, devs, intra, nic if len(hosts) > 1 else None, slots))
    from hetalloc.catalog import DEVICE_TYPES
    return Cluster(name, nodes, {**DEVICE_TYPES, **types}, 1.0, "hetalloc profile",
                   collectives=measured_collectives(figures.get("collectives", [])))


def build_profile(pa: ProfileArgs, ranks: list[dict[str, Any]], links: dict[str, Any]
                  ) -> tuple[CostGraph, Cluster, dict[str, Any]]:
    """The cost graph, cluster and report of one profile (module doc)."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    types, rank_types = device_types(ranks)
    layers = measured_layers(ranks, pa)
    tables = {t: time_table([r for r, n in zip(ranks, rank_types) if n == t], pa) for t in types}
    cg = CostGraph(pa.shape.name, pa.seq_len, PRECISION, layers, family=pa.shape.family,
                   model_spec=pa.shape.to_dict()).with_tables(tables)
    figures = link_figures(links, [r["host"] for r in ranks])
    cluster = measured_cluster(ranks, types, rank_types, figures, f"{node_name(ranks[0]['host'])}-profile")
    analytic = layer_shapes(pa.shape, pa.seq_len, 4)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "profile_report",
        "model": pa.shape.name, "model_spec": pa.shape.to_dict(), "seq_len": pa.seq_len, "batch_sizes": pa.batch_sizes,
        "warmup": pa.warmup, "repeats": pa.repeats, "dtype": pa.dtype, "torch": pa.torch_version,
        "world_size": len(ranks), "slowdown": {str(k): v for k, v in sorted(pa.slowdown.items())},
        "device_types": {n: {"peak_tflops": t.peak_tflops, "memory_gib": t.memory_gib,
                             "mem_bandwidth_gbps": t.mem_bandwidth_gbps, "vendor": t.vendor}
                         for n, t in types.items()},
        "ranks": [{"rank": r["rank"], "host": r["host"], "device": d.id, "type": t, "slowdown": r["slowdown"],
                   "threads": r["threads"], "peak_tflops": r["peak_tflops"], "memory_gib": r["memory_gib"],
                   "optimizer": r["optimizer"],
                   "optimizer_bandwidth_gbps": effective_memory_bandwidth_gbps(r["optimizer"]),
                   "peak_memory_bytes": r["layers"]["peak_memory_bytes"], "seconds": r["seconds"],
                   "compute_slots": r.get("compute_slots"), "interference": r.get("interference"),
                   "passes": r["layers"].get("passes"), "load_average": r.get("load_average")}
                  for r, t, d in zip(ranks, rank_types, cluster.devices)],
        "layers": [{"name": l.name, "kind": l.kind, "params": l.params, "params_analytic": a.params,
                    "saved_act_bytes": l.saved_act_bytes, "saved_act_bytes_analytic": a.saved_act_bytes,
                    "out_act_bytes": l.out_act_bytes, "saved_bytes_by_batch": s["saved_bytes_by_batch"]}
                   for l, a, s in zip(layers, analytic, ranks[0]["sizes"])],
        "links": {**figures, "raw": links},
        "turns": ranks[0].get("turns"),
        "noise_check": noise_check(ranks, rank_types),
        "cluster": cluster.to_dict(),
    }
    return cg, cluster, report


def write_cluster(out_dir: str | Path, cluster: Cluster) -> None:
    """DIR/cluster.yaml of a profile (atomically)."""
    atomic_write_text(Path(out_dir) / "cluster.yaml", "# Measured by 'hetalloc profile' (see report.json).\n"
                      + dump_cluster_yaml(cluster))


def write_profile(out_dir: str | Path, pa: ProfileArgs, ranks: list[dict[str, Any]],
                  links: dict[str, Any]) -> dict[str, Any]:
    """Write cost_graph.json, cluster.yaml and report.json; returns the report."""
    out = Path(out_dir)
    cg, cluster, report = build_profile(pa, ranks, links)
    cg.save(out / "cost_graph.json")
    write_cluster(out, cluster)
    report["files"] = {"cost_graph": str(out / "cost_graph.json"), "cluster": str(out / "cluster.yaml")}
    atomic_write_json(out / "report.json", report)
    return report


def report_lines(report: dict[str, Any], cg: CostGraph | None = None) -> list[str]:
    """A short human summary of a profile report."""
    lines = [f"profiled {report['model']} (seq {report['seq_len']}, micro-batches "
             f"{','.join(map(str, report['batch_sizes']))}, {report['repeats']} repeats) on "
             f"{report['world_size']} rank(s)"]
    for name, t in report["device_types"].items():
        ranks = [r["rank"] for r in report["ranks"] if r["type"] == name]
        lines.append(f"  {name}: ranks {','.join(map(str, ranks))}; matmul {t['peak_tflops'] * 1e3:.1f} GFLOP/s, "
                     f"optimizer {t['mem_bandwidth_gbps']:.2f} GB/s effective, {t['memory_gib']:.1f} GiB")
        if cg is not None and name in cg.tables:
            tab = cg.tables[name]
            for k, b in enumerate(tab.batch_sizes):
                f = sum(tab.fwd_s[i][k] for i in range(cg.num_layers))
                bw = sum(tab.bwd_s[i][k] for i in range(cg.num_layers))
                spread = max(max(tab.meta["fwd_iqr_rel"][i][k], tab.meta["bwd_iqr_rel"][i][k])
                             for i in range(cg.num_layers))
                lines.append(f"    micro-batch {b:>3}: forward {f * 1e3:8.3f} ms  backward {bw * 1e3:8.3f} ms  "
                             f"(largest layer IQR {100 * spread:.0f}%)")
    for key, label in (("p2p_intra", "p2p inside a node"), ("p2p_inter", "p2p across nodes"),
                       ("allreduce_intra", "all-reduce inside a node"), ("allreduce_inter", "all-reduce across nodes")):
        f = report["links"].get(key)
        if f:
            lines.append(f"  {label}: {f['fit']['bandwidth_gbps']:.3f} GB/s, {f['fit']['latency_us']:.1f} µs latency "
                         f"(fit error rms {100 * f['fit']['rms_rel_error']:.0f}%, {len(f['bytes'])} sizes)")
    for name, f in (report.get("runtime_overhead") or {}).get("per_type", {}).items():
        lines.append(f"  runtime's own time on {name}: {f['op_overhead_us']:.0f} µs per op, "
                     f"{f['step_overhead_us']:.0f} µs per step, inputs {f.get('data_us', 0.0):.0f} µs + "
                     f"{f.get('data_sample_us', 0.0):.1f} µs per sample; compute {f.get('op_compute_us', 0.0):.0f} µs per op "
                     f"beyond the layer times, step-to-step spread {100 * f.get('compute_noise', 0.0):.1f}%; "
                     f"collectives {f.get('collective_extra_us', 0.0):.0f} µs beyond their tables "
                     "(two short training runs)")
    ar = [t for t in report["links"].get("collectives", []) if t["op"] == "allreduce"]
    if ar:
        widest = max(ar, key=lambda t: len(t["ranks"]))
        lines.append(f"  collectives: {len(report['links']['collectives'])} tables (5 operations, "
                     f"{len(widest['bytes'])} sizes, groups of 2..{len(widest['ranks'])}); all-reduce among "
                     f"{len(widest['ranks'])}: {widest['seconds'][0] * 1e6:.0f} µs for {widest['bytes'][0]} B, "
                     f"{widest['seconds'][-1] * 1e3:.2f} ms for {widest['bytes'][-1] / 2**20:.0f} MiB")
    for r in report["ranks"]:
        i = r.get("interference")
        if i:
            kinds = [k for k in ("collective", "p2p") if k in i]
            lines.append(f"  rank {r['rank']}: compute beside communication "
                         + ", ".join(f"{k} {100 * i[k]['slowdown']:+.0f}%" for k in kinds)
                         + "; communication beside compute "
                         + ", ".join(f"{k} {100 * i[k]['stream_slowdown']:+.0f}%" for k in kinds))
    noise = report.get("noise_check")
    if noise and not noise["trusted"]:
        load = max((r["load_average"][0] for r in report["ranks"] if r.get("load_average")), default=0.0)
        lines.append(f"  WARNING: this profile is too noisy to trust: {'; '.join(noise['why'])} (load average "
                     f"{load:.1f} when it began); profile again on a quieter machine")
    saved = sum(l["saved_act_bytes"] for l in report["layers"])
    saved_a = sum(l["saved_act_bytes_analytic"] for l in report["layers"])
    lines.append(f"  saved activations: {saved / 2**20:.2f} MiB per sample measured "
                 f"({saved_a / 2**20:.2f} MiB by the analytic formulas)")
    return lines
