"""Whole numbers split in proportion to weights (largest-remainder, or Hamilton's, method).

Used wherever a count must be shared out in whole units: micro-batch samples among
devices by speed (allocator.baselines), new devices among the nodes that gave up old
ones (simulator.scenarios).
"""

from __future__ import annotations

import heapq
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
    weight = sum(weights)
    raw = [total * w / weight for w in weights]
    out = [max(minimum, math.floor(x)) for x in raw]
    have = sum(out)
    if have > total:  # the part furthest above its share (then the larger, then the first) gives one back
        heap = [(-(out[i] - raw[i]), -out[i], i) for i in range(n) if out[i] > minimum]
        heapq.heapify(heap)
        while have > total:
            _, _, k = heapq.heappop(heap)
            out[k] -= 1
            have -= 1
            if out[k] > minimum:
                heapq.heappush(heap, (-(out[k] - raw[k]), -out[k], k))
    if have < total:  # one more each, in order of remainder (ties: the earlier part), round after round
        order = sorted(range(n), key=lambda i: raw[i] - out[i], reverse=True)
        rounds, extra = divmod(total - have, n)
        for k, i in enumerate(order):
            out[i] += rounds + (1 if k < extra else 0)
    return out
