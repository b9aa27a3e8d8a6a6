"""Stage shapes: the stage columns of a model whose inner layers are identical blocks.

When every layer between the first (embedding) and the last (head) is the same block
(``Problem.interchangeable_blocks``), a stage's costs do not depend on *where* its blocks
are, only on how many it holds and whether it also holds the embedding or the head. A
stage is then one of four kinds: ``first`` (embedding + l blocks), ``inner`` (l blocks),
``last`` (l blocks + head), ``only`` (the whole model); a *shape* is a kind, a block count
and the devices of each class that serve it, with the exact costs of a column
(allocator.columns): stage time, tail, and how deep in a 1F1B pipeline it may sit.

A plan is then a multiset of shapes: one first and one last shape (or one ``only``)
plus inner shapes whose blocks add up with theirs to the model's blocks. The positions
of the inner stages do not change any cost except the in-flight memory of 1F1B, and an
order that fits memory exists exactly when, for every depth a, at most a inner stages
can sit no deeper than a (Hall's condition; ``order_stages`` builds it). So the search
over plans becomes a search over shape counts, with L times fewer columns than ranges
and no symmetric copies of one plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .columns import prefetch, range_arrays
from .problem import CountPlan, CountStage, Problem, StageTimer

INNER, FIRST, LAST, ONLY = 0, 1, 2, 3
KIND_NAMES = ("inner", "first", "last", "only")


@dataclass(frozen=True, slots=True)
class Shape:
    kind: int
    blocks: int
    counts: tuple[int, ...]
    t: float
    tail: float
    amax: int
    """Most stages that may follow it (>= L: any number)."""
    recompute: str = "none"

    @property
    def devices(self) -> int:
        return sum(self.counts)


def block_range(prob: Problem, kind: int, blocks: int) -> tuple[int, int]:
    """A layer range of this kind and block count (any position gives the same costs)."""
    L = prob.L
    if kind == FIRST:
        return 0, 1 + blocks
    if kind == LAST:
        return L - 1 - blocks, L
    if kind == ONLY:
        return 0, L
    return 1, 1 + blocks


class ShapeSet:
    """Shapes as arrays (one row each): what a build makes and a stage table reads, the
    Shape objects made only for the rows asked for (a plan's stages)."""

    def __init__(self, kind: np.ndarray, blocks: np.ndarray, counts: np.ndarray, t: np.ndarray, tail: np.ndarray,
                 amax: np.ndarray, rc: np.ndarray, names: tuple[str, ...]):
        self.kind, self.blocks, self.counts, self.t, self.tail, self.amax = kind, blocks, counts, t, tail, amax
        self.rc, self.names = rc, names
        """Each row's recomputation choice, as an index into names."""

    @classmethod
    def of(cls, shapes: list[Shape], C: int) -> "ShapeSet":
        names = tuple(sorted({s.recompute for s in shapes})) or ("none",)
        return cls(np.array([s.kind for s in shapes], dtype=np.int64), np.array([s.blocks for s in shapes], dtype=np.int64),
                   np.array([s.counts for s in shapes], dtype=np.int64).reshape(len(shapes), C),
                   np.array([s.t for s in shapes], dtype=np.float64), np.array([s.tail for s in shapes], dtype=np.float64),
                   np.array([s.amax for s in shapes], dtype=np.int64),
                   np.array([names.index(s.recompute) for s in shapes], dtype=np.int64), names)

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, k: int) -> Shape:
        return Shape(int(self.kind[k]), int(self.blocks[k]), tuple(int(x) for x in self.counts[k]), float(self.t[k]),
                     float(self.tail[k]), int(self.amax[k]), self.names[int(self.rc[k])])

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def take(self, rows) -> "ShapeSet":
        return ShapeSet(self.kind[rows], self.blocks[rows], self.counts[rows], self.t[rows], self.tail[rows],
                        self.amax[rows], self.rc[rows], self.names)


def block_shapes(prob: Problem, timer: StageTimer, M: int, t_cap: float, R: int = 1, unit: int = 1,
                 chunk: int = 1, memo=None) -> ShapeSet:
    """Every useful shape (allocator.columns' usefulness rules) running within t_cap, for
    one of R identical replicas (devices per replica; its micro-batch is timer.b), with
    device counts in multiples of ``unit`` and blocks in multiples of ``chunk``; ``memo``:
    an allocator.columns.ColumnMemo of the space's cost model."""
    assert prob.interchangeable_blocks
    K = prob.L - 2
    budget = [c.count // R for c in prob.classes]
    names = tuple(prob.recompute_options)
    parts = []
    specs = [(FIRST, l) for l in range(K + 1)] + [(INNER, l) for l in range(1, K + 1)] + \
            [(LAST, l) for l in range(K + 1)] + [(ONLY, K)]
    ranges = [block_range(prob, kind, l) for kind, l in specs if l % chunk == 0]
    prefetch(prob, timer, M, R, ranges, budget)
    for kind, l in specs:
        if l % chunk:
            continue
        i, j = block_range(prob, kind, l)
        for rc, cols in range_arrays(prob, timer, R, M, i, j, t_cap, budget, unit, memo):
            if len(cols):
                parts.append((kind, l, names.index(rc), cols))
    C = len(budget)
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return ShapeSet(z, z, np.zeros((0, C), dtype=np.int64), np.zeros(0), np.zeros(0), z, z, names)
    sizes = [len(c) for *_, c in parts]
    rep = lambda v: np.repeat(np.array(v, dtype=np.int64), sizes)  # noqa: E731
    return ShapeSet(rep([p[0] for p in parts]), rep([p[1] for p in parts]),
                    np.concatenate([c.counts for *_, c in parts]), np.concatenate([c.t for *_, c in parts]),
                    np.concatenate([c.tail for *_, c in parts]), np.concatenate([c.amax for *_, c in parts]),
                    rep([p[2] for p in parts]), names)


def order_stages(prob: Problem, chosen: list[Shape]) -> list[Shape] | None:
    """Pipeline order of a multiset of shapes that fits 1F1B memory (None if none does):
    first, inner stages by how deep they may sit (deepest first), last."""
    firsts = [s for s in chosen if s.kind in (FIRST, ONLY)]
    lasts = [s for s in chosen if s.kind == LAST]
    inner = sorted((s for s in chosen if s.kind == INNER), key=lambda s: (-s.amax, s.blocks, s.counts, s.recompute))
    if len(firsts) != 1 or (firsts[0].kind == ONLY) != (not lasts and not inner):
        return None
    seq = firsts + inner + lasts
    S = len(seq)
    if any(s.amax < S - 1 - p for p, s in enumerate(seq)):
        return None
    return seq


def count_plan(prob: Problem, seq: list[Shape], M: int, R: int = 1) -> CountPlan:
    """The count-level plan of an ordered list of shapes (layers assigned in order)."""
    stages, i = [], 0
    for s in seq:
        n = s.blocks + (1 if s.kind in (FIRST, ONLY) else 0) + (1 if s.kind in (LAST, ONLY) else 0)
        stages.append(CountStage(i, i + n, s.counts, s.recompute))
        i += n
    assert i == prob.L, (i, prob.L)
    return CountPlan(R, M, stages)
