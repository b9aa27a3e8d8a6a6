"""Shapes built ahead in a second process, for the search (allocator.search).

On a machine of two or more cores, while the search works on one micro-batch count, a
forked worker builds the shapes (allocator.shapes.block_shapes) of a count the search
will come to. A build ahead runs under the time cap of the incumbent when it starts,
which is at least the cap the search uses when it comes to that count (the incumbent
only improves); the search keeps the shapes within its own cap, which are exactly the
shapes a build under that cap makes, in the same order (allocator.columns.ColumnMemo's
rule). So the plans and bounds do not depend on which process built what, or when: only
the wall time does.

``HETALLOC_BUILD_AHEAD=0`` turns it off.
"""

from __future__ import annotations

import multiprocessing
import os

from .problem import Problem, StageTimer
from .shapes import ShapeSet, block_shapes

AHEAD_RANGES = 100
"""Smallest build worth sending to the worker, in stage kinds (block counts x kinds x
recomputation choices, ~0.2-0.5 ms each here whatever the count vectors): below it the
hand-over costs about what the build does."""

_SPACES: dict[int, tuple[list[Problem], dict]] = {}
"""Per search pass: its spaces and their column memos by space index, as the worker
inherits them when it is forked."""


def _build(pass_id: int, k: int, M: int, t_cap: float) -> ShapeSet:
    probs, memos = _SPACES[pass_id]
    prob = probs[k]
    return block_shapes(prob, StageTimer(prob, prob.global_batch // M), M, t_cap, 1, 1, memo=memos.get(k))


def enabled() -> bool:
    return os.environ.get("HETALLOC_BUILD_AHEAD", "1") != "0" and (os.cpu_count() or 1) >= 2 and \
        "fork" in multiprocessing.get_all_start_methods()


class Builder:
    """One worker process (forked when first needed) and its jobs: one at a time."""

    def __init__(self, spaces: dict[int, tuple[list[Problem], dict]]):
        _SPACES.clear()
        _SPACES.update(spaces)
        self.pool = None
        self.jobs: dict[tuple, tuple[float, object]] = {}

    def busy(self) -> bool:
        return any(not job.ready() for _, job in self.jobs.values())

    def submitted(self, key: tuple) -> bool:
        return key in self.jobs

    def submit(self, key: tuple, t_cap: float) -> None:
        """Build the shapes of (pass, space, M) = key (single units, one replica) ahead."""
        if self.pool is None:
            self.pool = multiprocessing.get_context("fork").Pool(1)
        self.jobs[key] = (t_cap, self.pool.apply_async(_build, (*key, t_cap)))

    def take(self, key: tuple, t_cap: float) -> ShapeSet | None:
        """The shapes built ahead for key within t_cap (waiting for them if need be), or
        None if none were (or under a smaller cap)."""
        job = self.jobs.pop(key, None)
        if job is None or job[0] < t_cap:
            return None
        shapes = job[1].get()
        if job[0] == t_cap:
            return shapes
        return shapes.take(shapes.t <= t_cap)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
        self.jobs.clear()
        _SPACES.clear()
