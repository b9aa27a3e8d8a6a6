"""The device a profiling rank measures: its name and memory, synchronisation, the
emulated slowdown, and the statistics kept of repeated timings. Imports torch (ranks only).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time

import torch

from ..config import stretch


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock(device: torch.device) -> float | None:
    """This thread's CPU time on CPU devices (what runtime.config.stretch stretches), else None."""
    return time.thread_time() if device.type == "cpu" else None


def stretched(slowdown: float, t0: float, device: torch.device, cpu0: float | None = None) -> float:
    """The runtime's emulated slowdown (runtime.pipeline): hold FACTOR - 1 times the
    compute since t0 (runtime.config.stretch; in CPU time since cpu0 on CPUs); returns
    the stretched elapsed time."""
    sync(device)
    return stretch(t0, slowdown, cpu0)


def stats(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"median": med, "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs),
            "iqr_rel": (q[2] - q[0]) / med if med > 0 else 0.0}
