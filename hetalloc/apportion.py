"""Whole numbers split in proportion to weights (largest-remainder, or Hamilton's, method).

Used wherever a count must be shared out in whole units: micro-batch samples among
devices by speed (allocator.baselines), new devices among the nodes that gave up old
ones (simulator.scenarios).
"""

from __future__ import annotations

import math


def largest_remainder(total: int, weights: list[float], minimum: int = 0) -> list[int]:
    """Split `total` into len(weights) whole parts, each >= `minimum`, as close to
    proportional as whole parts allow: every part gets the floor of its exact share (at
    least `minimum`), then the parts with the largest remainders get one more (ties: the
    earlier part). When the minimums overshoot, the parts above the minimum furthest above
    their exact share (then the larger) give one back. Returns [] when
    total < minimum * len(weights)."""
    n = len(weights)
    if total < minimum * n:
        return []
    raw = [total * w / sum(weights) for w in weights]
    out = [max(minimum, math.floor(x)) for x in raw]
    while sum(out) > total:
        k = max((i for i in range(n) if out[i] > minimum), key=lambda i: (out[i] - raw[i], out[i]))
        out[k] -= 1
    order = sorted(range(n), key=lambda i: raw[i] - out[i], reverse=True)
    k = 0
    while sum(out) < total:
        out[order[k % n]] += 1
        k += 1
    return out
