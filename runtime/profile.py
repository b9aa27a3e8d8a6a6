"""Entry point: measure this machine's devices and links for the planner.

    torchrun --nproc-per-node=N -m runtime.profile --model gpt2-tiny --seq 64 \\
        --batch-sizes 1,2,4,8,16 --out DIR [--slowdown 1=2]

(``hetalloc profile`` builds this command.) All ranks measure at the same time, as they
will run in training, and every figure is taken the way the runtime spends it:

- **layers**: whole-model passes (the runtime's layer cut, runtime.models), time stamps
  between consecutive layers on the forward and gradient hooks on every layer's input on
  the backward, so the per-layer times tile a pass: a stage's time is the sum of its
  layers' with one pass's framework overhead, as in a runtime op. The head's times
  include the loss, as the last stage's ops do. Warm-up passes, then repeats (at least
  MIN_TIMED_S of them); the median is kept, the spread recorded. ``--slowdown
  RANK=FACTOR`` stretches each pass exactly as the runtime stretches each op (holds
  FACTOR - 1 times the compute), and the stretched pass is shared among its layers in
  proportion to their compute.
- **sizes**: parameter counts of the real layers; saved-activation bytes per sample from
  saved-tensor hooks (distinct storages, parameters excluded; the slope between the
  smallest and largest batch); output bytes per sample; peak memory on GPUs.
- **optimizer**: the runtime's AdamW step plus gradient zeroing over flat buffers (as
  runtime.grad_sync lays parameters out), from cold caches as in training (on CPUs a
  256 MiB buffer is written between steps); it defines the device's effective memory
  bandwidth, the figure hetalloc.costs.optimizer_time divides by.
- **peak**: a square matmul in the training dtype (the reference calibration divides by).
- **links**: one-way p2p time between every pair of ranks (ping-pong halves, isend/irecv
  as runtime.pipeline uses them; one pair per node pair on large jobs) at generic sizes
  and at the activation sizes this model sends; all-reduce time within each node and
  across nodes (one rank per node).

Rank 0 gathers everything and writes DIR/cost_graph.json, DIR/cluster.yaml and
DIR/report.json (runtime.profile_files). Never: guess a figure that can be measured here.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import socket
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from hetalloc.errors import SpecError
from hetalloc.models import TransformerShape, layer_shapes, resolve_model

from .config import parse_slowdown, stretch
from .models import BuiltModel, build_model, token_loss_sum
from .profile_files import ProfileArgs, write_profile

GENERIC_P2P_BYTES = (4, 4096, 65536, 262144, 1 << 20, 4 << 20)
ALLREDUCE_BYTES = (4096, 65536, 1 << 20, 4 << 20, 16 << 20)
CACHE_FLUSH_BYTES = 256 << 20
"""Written between timed optimizer steps on CPUs (larger than any CPU's last-level cache)."""
MIN_TIMED_S = 0.5
"""Small micro-batches get more than --repeats passes: at least this many seconds of them
(up to MAX_LAYER_REPEATS), so that layers of tens of microseconds get a stable median."""
MAX_LAYER_REPEATS = 200
MAX_ALL_PAIRS = 8
"""Up to this many ranks every pair is measured; above it, one pair per node pair."""


# ---- the device ----------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model, as a device type name (letters, digits, '-')."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        raw = line.split(":", 1)[1]
                        break
        except OSError:
            pass
        raw = raw or platform.processor() or platform.machine() or "CPU"
        raw = re.sub(r"\b(\d+-Core Processor|Processor|CPU|@.*)", "", raw)
    name = re.sub(r"[^A-Za-z0-9.]+", "-", raw.replace("(R)", "").replace("(TM)", "")).strip("-")
    return name or "CPU"


def device_memory_gib(device: torch.device, ranks_on_node: int) -> float:
    """Device memory; on CPUs this rank's part of the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * 2**30
    return total / ranks_on_node / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stretch(slowdown: float, t0: float, device: torch.device) -> float:
    """The runtime's emulated slowdown (runtime.pipeline): hold FACTOR - 1 times the
    compute since t0 (runtime.config.stretch); returns the stretched elapsed time."""
    _sync(device)
    return stretch(t0, slowdown)


def stats(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"median": med, "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs),
            "iqr_rel": (q[2] - q[0]) / med if med > 0 else 0.0}


# ---- layers ---------------------------------------------------------------------------------

def _batch(shape: TransformerShape, seq: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + b)
    ids = torch.randint(shape.vocab, (b, seq), generator=g)
    classes = shape.num_labels if shape.family == "bert" else shape.vocab
    return ids.to(device), torch.randint(classes, (b, seq), generator=g).to(device)


def _flatten(params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters and gradients as views of two flat buffers (runtime.grad_sync's layout)."""
    n = sum(p.numel() for p in params)
    ref = params[0]
    pflat = torch.empty(n, dtype=ref.dtype, device=ref.device)
    gflat = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    at = 0
    for p in params:
        k = p.numel()
        pflat[at:at + k].copy_(p.detach().flatten())
        p.data = pflat[at:at + k].view_as(p)
        p.grad = gflat[at:at + k].view_as(p)
        at += k
    return pflat, gflat


def time_pass(layers: list[torch.nn.Module], ids: torch.Tensor, labels: torch.Tensor, loss_scale: float,
              slowdown: float, device: torch.device) -> tuple[list[float], list[float]]:
    """One forward and one backward of the whole model; per-layer seconds (module doc)."""
    L = len(layers)
    stamps = [time.perf_counter()]
    x = ids
    acts = []
    for layer in layers[:-1]:
        x = layer(x)
        _sync(device)
        acts.append(x)
        stamps.append(time.perf_counter())
    loss = token_loss_sum(layers[-1](x), labels) * loss_scale
    _sync(device)
    stamps.append(time.perf_counter())
    total_f = _stretch(slowdown, stamps[0], device)
    fwd = [stamps[i + 1] - stamps[i] for i in range(L)]
    marks = [0.0] * len(acts)

    def mark(i: int) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            _sync(device)
            marks[i] = time.perf_counter()
        return hook

    for i, a in enumerate(acts):
        a.register_hook(mark(i))
    t0 = time.perf_counter()
    torch.autograd.backward(loss)
    _sync(device)
    t1 = time.perf_counter()
    total_b = _stretch(slowdown, t0, device)
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
                   slowdown: float, device: torch.device, barrier: Callable[[], None]) -> dict[str, Any]:
    """Per batch size and layer: forward/backward statistics over `repeats` passes (more for
    small micro-batches: MIN_TIMED_S). An
    (untimed) AdamW step follows every pass, as in training: the passes are timed with
    the caches and memory in the state a training step leaves them in (timed back to
    back, without it, they ran 3-15% faster than the same work in runtime.train here)."""
    from .config import TrainConfig
    from .optim import build_optimizer

    params = list(built.model.parameters())
    _, gflat = _flatten(params)
    opt = build_optimizer("adamw", params, TrainConfig())
    fwd_stats, bwd_stats, peaks = [], [], {}
    for b in sorted(batches):
        ids, labels = _batch(built.shape, seq, b, device)
        scale = 1.0 / (b * seq)
        barrier()  # every rank measures each size at the same time, as in training
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs_f, runs_b = [], []

        def one_pass() -> tuple[list[float], list[float]]:
            gflat.zero_()
            times = time_pass(built.layers, ids, labels, scale, slowdown, device)
            opt.step()
            return times

        t_warm = time.perf_counter()
        for _ in range(warmup):
            one_pass()
        per_pass = (time.perf_counter() - t_warm) / warmup if warmup else math.inf
        for _ in range(max(repeats, min(MAX_LAYER_REPEATS, math.ceil(MIN_TIMED_S / per_pass)))):
            f, bw = one_pass()
            runs_f.append(f)
            runs_b.append(bw)
        if device.type == "cuda":
            peaks[str(b)] = torch.cuda.max_memory_allocated(device)
        L = len(built.layers)
        fwd_stats.append([stats([r[i] for r in runs_f]) for i in range(L)])
        bwd_stats.append([stats([r[i] for r in runs_b]) for i in range(L)])
    return {"batch_sizes": sorted(batches), "fwd": fwd_stats, "bwd": bwd_stats, "peak_memory_bytes": peaks or None}


def measure_optimizer(built: BuiltModel, warmup: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """The runtime's AdamW step + gradient zeroing, whole model and layer by layer."""
    from .config import TrainConfig
    from .optim import build_optimizer

    cfg = TrainConfig()

    # In training the forward and backward passes run between two optimizer steps and push
    # the optimizer's state out of the caches; timing steps back to back would keep it
    # there (a CPU's caches hold a small model's whole state: 2x faster than in a run).
    scratch = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.float32) if device.type == "cpu" else None

    def timed(params: list[torch.nn.Parameter]) -> float:
        _, gflat = _flatten(params)
        gflat.normal_()
        opt = build_optimizer("adamw", params, cfg)
        ts = []
        for k in range(warmup + repeats):
            if scratch is not None:
                scratch.fill_(float(k))
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            gflat.zero_()
            _sync(device)
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
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if k >= 3:
            ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(ts) / 1e12 / slowdown


# ---- links ----------------------------------------------------------------------------------

def pairs_to_measure(hosts: list[str]) -> list[tuple[int, int]]:
    """Every pair of ranks on small jobs; else one pair per node pair (and one per node)."""
    n = len(hosts)
    if n <= MAX_ALL_PAIRS:
        return [(a, b) for a in range(n) for b in range(a + 1, n)]
    first: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        first.setdefault(h, []).append(r)
    nodes = list(first)
    out = [(first[h][0], first[h][1]) for h in nodes if len(first[h]) > 1]
    out += [(first[a][0], first[b][0]) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    return out


def p2p_one_way(rank: int, a: int, b: int, nbytes: int, warmup: int, repeats: int, device: torch.device) -> float:
    """Median one-way seconds between ranks a and b (half a ping-pong); 0 on other ranks."""
    if rank not in (a, b):
        return 0.0
    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    peer = b if rank == a else a
    ts = []
    for k in range(warmup + repeats):
        t0 = time.perf_counter()
        if rank == a:
            dist.isend(buf, peer).wait()
            dist.irecv(buf, peer).wait()
        else:
            dist.irecv(buf, peer).wait()
            dist.isend(buf, peer).wait()
        _sync(device)
        if k >= warmup:
            ts.append((time.perf_counter() - t0) / 2)
    return statistics.median(ts)


def allreduce_time(nbytes: int, group, warmup: int, repeats: int, device: torch.device) -> float:
    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    ts = []
    for k in range(warmup + repeats):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        _sync(device)
        if k >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_links(rank: int, hosts: list[str], p2p_bytes: list[int], repeats: int,
                  device: torch.device) -> dict[str, Any]:
    """p2p per measured pair and all-reduce per node and across nodes (module doc).
    Every rank calls this; rank 0's return value holds the results."""
    p2p = []
    for a, b in pairs_to_measure(hosts):
        row = []
        for n in p2p_bytes:
            dist.barrier()
            row.append(p2p_one_way(rank, a, b, n, 5, repeats, device))
        got: list[Any] = [None] * len(hosts)
        dist.all_gather_object(got, row)
        p2p.append({"ranks": [a, b], "hosts": [hosts[a], hosts[b]], "bytes": list(p2p_bytes), "seconds": got[a]})
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    sets = [("intra", h, ranks) for h, ranks in by_host.items()]
    if len(by_host) > 1:
        sets.append(("inter", "*", [ranks[0] for ranks in by_host.values()]))
    allreduce = []
    for scope, host, ranks in sets:
        group = dist.new_group(ranks)  # collective: every rank creates every group
        if len(ranks) < 2:
            continue
        row = [allreduce_time(n, group, 3, max(5, repeats // 2), device) if rank in ranks else 0.0
               for n in ALLREDUCE_BYTES]
        got = [None] * len(hosts)
        dist.all_gather_object(got, row)
        per_size = [max(got[r][k] for r in ranks) for k in range(len(ALLREDUCE_BYTES))]
        allreduce.append({"scope": scope, "host": host, "ranks": ranks, "bytes": list(ALLREDUCE_BYTES),
                          "seconds": per_size})
    return {"p2p": p2p, "allreduce": allreduce}


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-tiny", help="built-in model or a Hugging Face config.json")
    p.add_argument("--seq", type=int, default=None, help="sequence length in tokens (default: the model's context)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="micro-batch sizes (samples), comma-separated")
    p.add_argument("--warmup", type=int, default=3, help="passes before timing, per batch size")
    p.add_argument("--repeats", type=int, default=15, help="timed passes per batch size (the median is kept)")
    p.add_argument("--link-repeats", type=int, default=40, help="timed transfers per message size")
    p.add_argument("--slowdown", action="append", metavar="RANK=FACTOR",
                   help="profile RANK as the runtime runs it with --slowdown RANK=FACTOR")
    p.add_argument("--dtype", choices=("float32",), default="float32", help="training dtype (the runtime's)")
    p.add_argument("--out", default="out/profile", help="directory for cost_graph.json, cluster.yaml, report.json")
    return p.parse_args(argv)


def _init() -> tuple[int, int, torch.device]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # one process without torchrun
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        addr = f"tcp://127.0.0.1:{port.getsockname()[1]}"
        port.close()
        dist.init_process_group(backend, init_method=addr, rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
        return dist.get_rank(), local, torch.device("cuda", local)
    return dist.get_rank(), local, torch.device("cpu")


def profile(args: argparse.Namespace) -> dict[str, Any] | None:
    rank, local, device = _init()
    world = dist.get_world_size()
    slow = parse_slowdown(args.slowdown)
    for key in slow:
        if not key.isdigit() or int(key) >= world:
            raise SpecError("--slowdown", key, f"is not a rank of this profile (0..{world - 1})", "write RANK=FACTOR")
    slowdown = slow.get(str(rank), 1.0)
    shape = resolve_model(args.model)
    seq = args.seq or shape.max_seq
    layer_shapes(shape, seq, 4)  # checks seq against the model's context
    try:
        batches = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    except ValueError:
        raise SpecError("--batch-sizes", "", f"expected comma-separated integers, got '{args.batch_sizes}'") from None
    if not batches or batches[0] < 1:
        raise SpecError("--batch-sizes", "", "needs at least one size >= 1", "e.g. --batch-sizes 1,2,4,8")
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    dtype = torch.float32
    t_start = time.perf_counter()
    built = build_model(shape, seed=0, dtype=dtype)
    built.model.to(device)
    sizes = measure_sizes(built, seq, batches, device)
    dist.barrier()
    layers = measure_layers(built, seq, batches, args.warmup, args.repeats, slowdown, device, dist.barrier)
    dist.barrier()
    optimizer = measure_optimizer(built, 2, max(5, args.repeats // 2), device)
    dist.barrier()
    peak = measure_peak_tflops(dtype, device, slowdown)
    act = [int(b * s["out_act_bytes"]) for s in sizes[:-1] for b in batches]
    p2p_bytes = sorted(set(GENERIC_P2P_BYTES) | {n for n in act if n > 0})
    links = measure_links(rank, hosts, p2p_bytes, args.link_repeats, device) if world > 1 else {"p2p": [], "allreduce": []}
    mine = {
        "rank": rank, "local_rank": local, "host": hosts[rank], "device_name": device_name(device),
        "vendor": "cpu" if device.type == "cpu" else "nvidia", "slowdown": slowdown,
        "memory_gib": device_memory_gib(device, sum(1 for h in hosts if h == hosts[rank])),
        "threads": torch.get_num_threads(), "peak_tflops": peak, "sizes": sizes, "layers": layers,
        "optimizer": optimizer, "seconds": time.perf_counter() - t_start,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    pa = ProfileArgs(model=args.model, shape=shape, seq_len=seq, batch_sizes=batches, warmup=args.warmup,
                     repeats=args.repeats, slowdown={int(k): v for k, v in slow.items()},
                     torch_version=torch.__version__, dtype="float32")
    return write_profile(args.out, pa, gathered, links)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .train import run_entry

    return run_entry(lambda: profile(args))


if __name__ == "__main__":
    from runtime.train import exit_rank

    exit_rank(main())
