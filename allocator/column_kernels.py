"""The compiled inner loops of allocator.columns: a range's stage times and columns.

Stage time of a count vector: the smallest share time (a "level") at or above every used
class's one-sample time at which the vector's devices can take b samples (each device
takes the shares that run within the level). Columns: allocator.columns' usefulness
rules, one per depth range of equal time.
"""

from __future__ import annotations

import numpy as np

from .dp import njit


@njit(cache=True)
def columns_kernel(ts, caps, bounds, grid, strides, n_dev, one_size, b, t_cap, tier_of, L):
    """The columns of one range (allocator.columns._range_columns) from its shares' times
    ``ts`` (classes x shares), every tier's caps per unit-count step (``caps``: tiers x
    steps x classes; step s holds the grid's vectors whose unit count is in [bounds[s],
    bounds[s + 1])) and each depth's tier: (grid row, time, amax) of every column, vector
    by vector, shallow to deep."""
    G, C = grid.shape
    n_tiers = caps.shape[0]
    times = np.full((n_tiers, G), np.inf)
    keep = np.zeros(G, dtype=np.bool_)
    for q in range(n_tiers):
        tq = times[q]
        for s in range(caps.shape[1]):
            lo, hi = bounds[q, s], bounds[q, s + 1]
            if hi <= lo:
                continue
            stage_times_of(ts, caps[q, s], grid, n_dev, lo, hi, b, tq)
        # A vector is useful if at some tier it runs within the cap and every device
        # matters there (one device fewer of any used class is slower or cannot take the
        # micro-batch); at other tiers another vector with fewer devices does as well.
        for r in range(G):
            t = tq[r]
            if not (t <= t_cap and t < np.inf) or not one_size[r]:
                continue
            ok = True
            if n_dev[r] > 1:
                for c in range(C):
                    if grid[r, c] > 0 and tq[r - strides[c]] <= t:
                        ok = False
                        break
            if ok:
                keep[r] = True
    D = len(tier_of)
    n_out = 0
    for r in range(G):
        if keep[r]:
            n_out += D
    rows = np.empty(n_out, dtype=np.int64)
    t_col = np.empty(n_out)
    amax = np.empty(n_out, dtype=np.int64)
    m = 0
    for r in range(G):
        if not keep[r]:
            continue
        # one column per depth range of equal time, each as deep as that time holds; the
        # last ends where the time no longer fits, or reaches the last depth (any depth: L)
        ended = False
        for a in range(D - 1):
            now, later = times[tier_of[a], r], times[tier_of[a + 1], r]
            over = not (later <= t_cap and later < np.inf)
            if later > now or over:
                rows[m], t_col[m], amax[m] = r, now, a
                m += 1
            if over:
                ended = True
                break
        if not ended:
            rows[m], t_col[m], amax[m] = r, times[tier_of[D - 1], r], L
            m += 1
    return rows[:m], t_col[:m], amax[:m]


@njit(cache=True)
def stage_times_of(ts, cap, grid, n_dev, lo, hi, b, out):
    """Stage time of the grid's vectors whose unit count is in [lo, hi) (and at most b),
    with class c's shares cut at cap[c], into out (left as it is where the vector never
    takes b samples)."""
    C = grid.shape[1]
    total = 0
    for c in range(C):
        total += cap[c]
    if total == 0:
        return
    vals = np.empty(total)
    m = 0
    for c in range(C):
        for k in range(cap[c]):
            vals[m] = ts[c, k]
            m += 1
    levels = np.unique(vals)
    nl = len(levels)
    K = np.zeros((nl, C))
    first = np.full(C, np.inf)
    for c in range(C):
        if cap[c] > 0:
            K[:, c] = np.searchsorted(ts[c, :cap[c]], levels * (1 + 1e-12), side="right")
            first[c] = ts[c, 0]
    for r in range(grid.shape[0]):
        n = n_dev[r]
        if n < lo or n >= hi or n > b:
            continue
        top = 0.0
        floor = 0.0
        for c in range(C):
            v = grid[r, c]
            top += v * K[nl - 1, c]
            if v > 0 and first[c] > floor:
                floor = first[c]
        if top < b:
            continue
        k_lo = np.searchsorted(levels, floor)  # the first level at or above the floor that reaches b
        k_hi = nl - 1
        while k_lo < k_hi:
            mid = (k_lo + k_hi) // 2
            cap_mid = 0.0
            for c in range(C):
                cap_mid += grid[r, c] * K[mid, c]
            if cap_mid >= b:
                k_hi = mid
            else:
                k_lo = mid + 1
        if k_lo < nl:
            out[r] = levels[k_lo]
