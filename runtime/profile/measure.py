"""Entry point: measure this machine's devices and links for the planner.

    torchrun --nproc-per-node=N -m runtime.profile --model gpt2-tiny --seq 64 \\
        --batch-sizes 1,2,4,8,16 --out DIR [--slowdown 1=2]

(``hetalloc profile`` builds this command.) Ranks measure at the same time, as they
will run in training, except where a host has more ranks than compute slots (CPU cores,
or GPUs for time-sliced processes): there its ranks measure compute in turns of as many
as it has slots (``compute_turns``), so that each figure is the rank's own, and the
simulator shares the slots among the ranks that compute at one time (the host's
``compute_slots``, written into cluster.yaml). Every figure is taken the way the runtime
spends it:

- **layers**: whole-model passes (the runtime's layer cut, runtime.models), time stamps
  between consecutive layers on the forward and gradient hooks on every layer's input on
  the backward, so the per-layer times tile a pass: a stage's time is the sum of its
  layers' with one pass's framework overhead, as in a runtime op. The head's times
  include the loss, as the last stage's ops do. The backward is timed twice: right
  after its forward (warm: a 1F1B last stage, one micro-batch) and after a write of
  twice the last-level cache between the forward and the backward (cold: a backward
  that other ops ran before, its saved activations back from memory; GPipe, the 1F1B
  warm-up; ``TimeTable.bwd_cold_s``, ``hetalloc.schedule.warm_backward``). Warm-up passes, then repeats (at least
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
- **collectives**: all-reduce, reduce-scatter, all-gather, broadcast and reduce over a
  sweep of sizes for every group size within each host and across hosts
  (runtime.profile.collectives), the tables the cost formulas read.
- **interference**: a matmul alone and beside an all-reduce stream and a send/receive
  stream (runtime.profile.collectives): how much slower compute runs while the rank
  communicates.

Rank 0 gathers everything and writes DIR/cost_graph.json, DIR/cluster.yaml and
DIR/report.json (runtime.profile.files). Never: guess a figure that can be measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from hetalloc.models import layer_shapes, resolve_model

from ..config import check_slowdown, parse_batch_sizes, parse_slowdown
from ..launch import free_port
from ..models import build_model
from ..train import run_entry
from .device import device_memory_gib, device_name
from .files import ProfileArgs, write_profile
from .collectives import compute_turns, measure_collectives, measure_interference
from .layers import measure_layers, measure_optimizer, measure_peak_tflops, measure_sizes
from .links import GENERIC_P2P_BYTES, measure_links


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
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
        return dist.get_rank(), local, torch.device("cuda", local)
    return dist.get_rank(), local, torch.device("cpu")


def compute_slots(device: torch.device) -> int:
    """Devices' worth of compute this rank's host can run at once: its usable CPU cores
    (CPU ranks), or its GPUs."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def profile(args: argparse.Namespace) -> dict[str, Any] | None:
    rank, local, device = _init()
    world = dist.get_world_size()
    slow = parse_slowdown(args.slowdown)
    check_slowdown(slow, world, None, "profile")
    slowdown = slow.get(str(rank), 1.0)
    shape = resolve_model(args.model)
    seq = args.seq or shape.max_seq
    layer_shapes(shape, seq, 4)  # checks seq against the model's context
    batches = parse_batch_sizes(args.batch_sizes)
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    slots: list[Any] = [None] * world
    dist.all_gather_object(slots, compute_slots(device))
    turns = compute_turns(hosts, slots)
    load_before = os.getloadavg()[0]
    dtype = torch.float32
    t_start = time.perf_counter()
    built = build_model(shape, seed=0, dtype=dtype)
    built.model.to(device)
    sizes = measure_sizes(built, seq, batches, device)
    dist.barrier()
    layers = measure_layers(built, seq, batches, args.warmup, args.repeats, slowdown, device, dist.barrier,
                            turns=turns, rank=rank)
    dist.barrier()
    optimizer = measure_optimizer(built, 2, max(5, args.repeats // 2), device)
    dist.barrier()
    peak = measure_peak_tflops(dtype, device, slowdown)
    act = [int(b * s["out_act_bytes"]) for s in sizes[:-1] for b in batches]
    p2p_bytes = sorted(set(GENERIC_P2P_BYTES) | {n for n in act if n > 0})
    links = measure_links(rank, hosts, p2p_bytes, args.link_repeats, device) if world > 1 else {"p2p": [], "allreduce": []}
    links["collectives"] = measure_collectives(rank, hosts, device) if world > 1 else []
    grads = 4 * sum(p.numel() for p in built.model.parameters())
    stream = {"p2p": int(statistics.median(n for n in act if n > 0)) if any(act) else 1 << 20,
              "collective": min(grads, 25 << 20)}
    interference = measure_interference(rank, hosts, slots, slowdown, device, stream) if world > 1 else None
    mine = {
        "rank": rank, "local_rank": local, "host": hosts[rank], "device_name": device_name(device),
        "vendor": "cpu" if device.type == "cpu" else "nvidia", "slowdown": slowdown,
        "memory_gib": device_memory_gib(device, sum(1 for h in hosts if h == hosts[rank])),
        "threads": torch.get_num_threads(), "peak_tflops": peak, "sizes": sizes, "layers": layers,
        "optimizer": optimizer, "seconds": time.perf_counter() - t_start, "compute_slots": slots[rank],
        "interference": interference, "turns": turns,
        "load_average": [load_before, os.getloadavg()[0]],
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
    return run_entry(lambda: profile(args))
