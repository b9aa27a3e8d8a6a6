"""Per-layer forward and backward times, per-layer sizes, the optimizer step and the
matmul peak of one profiling rank (see runtime.profile.measure for how each is taken).
Imports torch (ranks only).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hetalloc.models import TransformerShape

from ..config import TrainConfig
from ..grad_sync import flat_views
from ..models import BuiltModel, token_loss_sum
from ..optim import build_optimizer
from .device import cpu_clock, stats, stretched, sync

CACHE_FLUSH_BYTES = 256 << 20
"""Written between timed optimizer steps on CPUs (larger than any CPU's last-level cache)."""
MIN_TIMED_S = 0.5
"""Small micro-batches get more than --repeats passes: at least this many seconds of them
(up to MAX_LAYER_REPEATS), so that layers of tens of microseconds get a stable median."""
MAX_LAYER_REPEATS = 200
COLD_CACHE_FACTOR = 2
"""The cold backward is timed after writing this many times the last-level cache."""
COLD_CACHE_DEFAULT_BYTES = 32 << 20
"""The last-level cache assumed where the device does not say."""
COLD_REPEATS_MIN = 6
"""Cold passes per batch size: half of --repeats, at least this many."""
ROUNDS = 3
"""The batch sizes are timed in this many rounds, one size after the other in each, every
size's passes split over the rounds: a slow phase of the host (the quiet host's passes
drifted 14-35 % within one size's half second) then spreads over all sizes instead of
biasing the one timed during it, and the sizes' times agree with each other (a table
is interpolated and extrapolated between them)."""


def _batch(shape: TransformerShape, seq: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + b)
    ids = torch.randint(shape.vocab, (b, seq), generator=g)
    classes = shape.num_labels if shape.family == "bert" else shape.vocab
    return ids.to(device), torch.randint(classes, (b, seq), generator=g).to(device)


def cache_bytes(device: torch.device) -> int:
    """The device's last-level cache (CPUs: the largest cache sysfs lists for cpu0; GPUs:
    L2), COLD_CACHE_DEFAULT_BYTES where it cannot be read."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or COLD_CACHE_DEFAULT_BYTES
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or COLD_CACHE_DEFAULT_BYTES


def flusher(device: torch.device) -> Callable[[], None]:
    """Writes COLD_CACHE_FACTOR x the last-level cache: what a pass's saved activations
    meet when other work runs between its forward and its backward."""
    buf = torch.empty(COLD_CACHE_FACTOR * cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buf.add_(1.0)
        sync(device)
    return flush


def time_pass(layers: list[torch.nn.Module], ids: torch.Tensor, labels: torch.Tensor, loss_scale: float,
              slowdown: float, device: torch.device,
              between: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """One forward and one backward of the whole model; per-layer seconds (module doc).
    between: run (untimed) after the forward, before the backward (a cache flush)."""
    L = len(layers)
    stamps = [time.perf_counter()]
    cpu0 = cpu_clock(device)
    x = ids
    acts = []
    for layer in layers[:-1]:
        x = layer(x)
        sync(device)
        acts.append(x)
        stamps.append(time.perf_counter())
    loss = token_loss_sum(layers[-1](x), labels) * loss_scale
    sync(device)
    stamps.append(time.perf_counter())
    total_f = stretched(slowdown, stamps[0], device, cpu0)
    fwd = [stamps[i + 1] - stamps[i] for i in range(L)]
    marks = [0.0] * len(acts)

    def mark(i: int) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            sync(device)
            marks[i] = time.perf_counter()
        return hook

    for i, a in enumerate(acts):
        a.register_hook(mark(i))
    if between is not None:
        between()
    t0 = time.perf_counter()
    cpu0 = cpu_clock(device)
    torch.autograd.backward(loss)
    sync(device)
    t1 = time.perf_counter()
    total_b = stretched(slowdown, t0, device, cpu0)
    # acts[i] is layer i's output: its gradient is ready when layer i + 1's backward ends.
    ends = [t1] + marks  # ends[j] = end of layer j's backward
    starts = marks + [t0]
    bwd = [ends[j] - starts[j] for j in range(L)]
    sf, sb = total_f / (stamps[-1] - stamps[0]), total_b / (t1 - t0)
    return [t * sf for t in fwd], [t * sb for t in bwd]


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                exclude: set[int]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves in one forward of `layer` (the
    parameters' storages excluded); also returns the layer's output."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
        if labels is not None:
            out = token_loss_sum(out, labels)
    return sum(seen.values()), out


def measure_sizes(built: BuiltModel, seq: int, batches: list[int], device: torch.device) -> list[dict[str, Any]]:
    """Per layer: parameters, saved-activation and output bytes per sample."""
    layers = built.layers
    exclude = {p.untyped_storage().data_ptr() for p in built.model.parameters()}
    per_batch = []
    for b in sorted({min(batches), max(batches)}):
        ids, labels = _batch(built.shape, seq, b, device)
        x = ids
        row = []
        for i, layer in enumerate(layers):
            head = i == len(layers) - 1
            inp = x if i == 0 else x.detach().requires_grad_()
            nbytes, out = saved_bytes(layer, inp, labels if head else None, exclude)
            row.append((nbytes, 4 if head else out.numel() * out.element_size()))
            x = out
        per_batch.append((b, row))
    out = []
    for i, layer in enumerate(layers):
        (b1, r1), (b2, r2) = per_batch[0], per_batch[-1]
        if b2 > b1:
            saved = (r2[i][0] - r1[i][0]) / (b2 - b1)
        else:
            saved = r1[i][0] / b1
        out_bytes = r1[i][1] if i == len(layers) - 1 else r1[i][1] / b1
        out.append({"params": sum(p.numel() for p in layer.parameters()),
                    "saved_act_bytes": float(max(0.0, saved)), "out_act_bytes": float(out_bytes),
                    "saved_bytes_by_batch": {str(b): r[i][0] for b, r in per_batch}})
    return out


def measure_layers(built: BuiltModel, seq: int, batches: list[int], warmup: int, repeats: int,
                   slowdown: float, device: torch.device, barrier: Callable[[], None],
                   turns: list[list[int]] | None = None, rank: int = 0) -> dict[str, Any]:
    """Per batch size and layer: forward/backward statistics over `repeats` passes (more for
    small micro-batches: MIN_TIMED_S), and the backward from cold caches over at least
    COLD_REPEATS_MIN more (a flush between the forward and the backward; cold passes
    alternate with warm ones, so that both see the host in the same state). An
    (untimed) AdamW step follows every pass, as in training: the passes are timed with
    the caches and memory in the state a training step leaves them in (timed back to
    back, without it, they ran 3-15% faster than the same work in runtime.train here).
    The sizes are timed in ROUNDS rounds, each size's passes split over them.
    turns: groups of ranks that measure at the same time, one group after the other
    (runtime.profile.collectives.compute_turns; None: all at once). Also returns the
    spread of whole passes and the drift between the first and second half of the
    repeats, the figures the profile judges its own noise by."""
    params = list(built.model.parameters())
    _, gflat = flat_views(params)
    opt = build_optimizer("adamw", params, TrainConfig())
    turns = turns or [[rank]]
    mine = next((k for k, t in enumerate(turns) if rank in t), 0)
    flush = flusher(device)
    sizes = sorted(batches)
    state: dict[int, dict[str, Any]] = {}
    peaks: dict[str, int] = {}
    for rnd in range(ROUNDS):
        for b in sizes:
            for k in range(mine):  # earlier turns measure this size first
                barrier()
            barrier()  # the ranks of a turn measure each size at the same time, as in training
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if rnd == 0:
                ids, labels = _batch(built.shape, seq, b, device)
                st = state[b] = {"ids": ids, "labels": labels, "f": [], "b": [], "c": []}
            st = state[b]

            def one_pass(between: Callable[[], None] | None = None, st=st, b=b) -> tuple[list[float], list[float]]:
                gflat.zero_()
                times = time_pass(built.layers, st["ids"], st["labels"], 1.0 / (b * seq), slowdown, device, between)
                opt.step()
                return times

            if rnd == 0:
                t_warm = time.perf_counter()
                for _ in range(warmup):
                    one_pass()
                per_pass = (time.perf_counter() - t_warm) / warmup if warmup else math.inf
                st["n"] = max(repeats, min(MAX_LAYER_REPEATS, math.ceil(MIN_TIMED_S / per_pass)))
                st["n_cold"] = max(COLD_REPEATS_MIN, repeats // 2)
            elif warmup:
                one_pass()  # after the other sizes: one untimed pass
            n_warm = st["n"] * (rnd + 1) // ROUNDS - st["n"] * rnd // ROUNDS
            n_cold = st["n_cold"] * (rnd + 1) // ROUNDS - st["n_cold"] * rnd // ROUNDS
            for j in range(max(n_warm, n_cold)):
                if j < n_warm:  # warm: the backward right after its forward
                    f, bw = one_pass()
                    st["f"].append(f)
                    st["b"].append(bw)
                if j < n_cold:  # cold: the forward, a flush of the last-level cache, the backward
                    st["c"].append(one_pass(flush)[1])
            if device.type == "cuda":
                peaks[str(b)] = max(peaks.get(str(b), 0), torch.cuda.max_memory_allocated(device))
            for k in range(mine + 1, len(turns)):  # then wait for the later turns
                barrier()
    L = len(built.layers)
    fwd_stats, bwd_stats, cold_stats, passes = [], [], [], []
    for b in sizes:
        st = state[b]
        fwd_stats.append([stats([r[i] for r in st["f"]]) for i in range(L)])
        bwd_stats.append([stats([r[i] for r in st["b"]]) for i in range(L)])
        cold_stats.append([stats([r[i] for r in st["c"]]) for i in range(L)])
        whole = [sum(f) + sum(bw) for f, bw in zip(st["f"], st["b"])]
        half = len(whole) // 2
        drift = (statistics.median(whole[half:]) / statistics.median(whole[:half]) - 1.0) if half else 0.0
        passes.append({"batch_size": b, **stats(whole), "drift_rel": drift, "repeats": len(whole)})
    return {"batch_sizes": sizes, "fwd": fwd_stats, "bwd": bwd_stats, "bwd_cold": cold_stats,
            "cache_flush_bytes": COLD_CACHE_FACTOR * cache_bytes(device), "peak_memory_bytes": peaks or None,
            "passes": passes, "turns": turns, "rounds": ROUNDS}


def measure_optimizer(built: BuiltModel, warmup: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """The runtime's AdamW step + gradient zeroing, whole model and layer by layer."""
    cfg = TrainConfig()

    # In training the forward and backward passes run between two optimizer steps and push
    # the optimizer's state out of the caches; timing steps back to back would keep it
    # there (a CPU's caches hold a small model's whole state: 2x faster than in a run).
    scratch = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.float32) if device.type == "cpu" else None

    def timed(params: list[torch.nn.Parameter]) -> float:
        _, gflat = flat_views(params)
        gflat.normal_()
        opt = build_optimizer("adamw", params, cfg)
        ts = []
        for k in range(warmup + repeats):
            if scratch is not None:
                scratch.fill_(float(k))
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            gflat.zero_()
            sync(device)
            if k >= warmup:
                ts.append(time.perf_counter() - t0)
            gflat.normal_()
        return statistics.median(ts)

    whole = list(built.model.parameters())
    per_layer = [timed(list(layer.parameters())) for layer in built.layers]
    return {"optimizer": "adamw", "params": sum(p.numel() for p in whole),
            "tensors": len(whole), "seconds": timed(whole),
            "per_layer": [{"params": sum(p.numel() for p in layer.parameters()),
                           "tensors": len(list(layer.parameters())), "seconds": t}
                          for layer, t in zip(built.layers, per_layer)]}


def measure_peak_tflops(dtype: torch.dtype, device: torch.device, slowdown: float, repeats: int = 10) -> float:
    """Dense matmul throughput in the training dtype (divided by the emulated slowdown)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ts = []
    for k in range(3 + repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if k >= 3:
            ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(ts) / 1e12 / slowdown
