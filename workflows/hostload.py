"""How much of this host's CPU other processes took while something ran.

Measurements of runs on a shared host (benchmarks/sim_accuracy.py, benchmarks/adaptive.py)
are only as good as the host is quiet. ``ForeignCpu`` reads the host's busy CPU time
(/proc/stat) and this process's own CPU time with that of its finished children
(getrusage: a torchrun launch and its ranks, once waited for) around a block; the
difference is what other processes used, reported as a share of the host's cores over
the block's wall time. A measurement can then say it was disturbed, and be repeated.

Linux only (elsewhere the share is None). Never imports torch.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

DISTURBED = 0.10
"""Share of the host's CPU taken by other processes above which a measurement counts
as disturbed."""


def _busy_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already inside user / nice
    return (sum(ticks) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class ForeignCpu:
    """``with ForeignCpu() as f: ...``; then ``f.share``: other processes' CPU over the
    block as a share of the host's cores (0: none; None: not measurable here)."""

    def __init__(self) -> None:
        self.share: float | None = None
        self.seconds: float | None = None

    def __enter__(self) -> "ForeignCpu":
        self._t, self._busy, self._own = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_s()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._t
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.seconds = max(0.0, (busy - self._busy) - (_own_s() - self._own))
        self.share = self.seconds / (wall * cores) if wall > 0 else 0.0

    @property
    def disturbed(self) -> bool:
        return self.share is not None and self.share > DISTURBED
