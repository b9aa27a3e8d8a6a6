"""allocator.dp's program against a brute-force enumeration of the plans it optimises.

Random small tables of stage options (anywhere-options like block shapes, and
fixed-position options like layer ranges): every chain from a last stage to a first one
that covers the model, fits the class budgets and respects each option's in-flight depth
(``amax``: the stages behind it) is enumerated; ``min_stage_sum`` must return the least
sum of stage times and a plan that attains it, ``min_bottleneck`` the least slowest
stage, with and without a limit.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from allocator.dp import FIRST, INNER, LAST, ONLY, Option, StageTable, min_bottleneck, min_stage_sum


def random_table(seed: int) -> tuple[StageTable, list[int]]:
    rng = random.Random(seed)
    C = rng.choice([1, 2, 3])
    budgets = [rng.randint(1, 4) for _ in range(C)]
    X = rng.randint(2, 6)
    fixed = rng.random() < 0.4  # layer ranges (a position each) instead of shapes
    L = X + 2 if not fixed else X
    opts = []
    for _ in range(rng.randint(4, 40)):
        kind = rng.choice([INNER, INNER, FIRST, LAST, ONLY] if not fixed else [INNER, INNER, FIRST, LAST])
        counts = tuple(rng.randint(0, min(2, n)) for n in budgets)  # (an option fits the budgets)
        if sum(counts) == 0:
            counts = (1,) + counts[1:]
        if kind == ONLY:
            span, xf = X, 0
        elif fixed:
            span = rng.randint(1, X - 1)
            xf = 0 if kind == LAST else (X - span if kind == FIRST else rng.randint(1, X - span))
        else:
            span = rng.randint(0 if kind in (FIRST, LAST) else 1, X)
            xf = 0 if kind == LAST else -1
        amax = rng.choice([1, 2, 3, 10 ** 6])
        t = round(rng.uniform(0.1, 2.0), 1)  # coarse: ties between plans happen
        opts.append(Option(kind, xf, span, counts, t, 0.0, amax, len(opts)))
    return StageTable(opts, budgets, X, L), budgets


def brute(tab: StageTable, budgets: list[int], use: np.ndarray) -> tuple[float, float]:
    """(least sum, least bottleneck) over every plan of the usable options."""
    opts = [o for o, u in zip(tab.options, use) if u]
    best = [math.inf, math.inf]

    def score(chain):
        best[0] = min(best[0], sum(o.t for o in chain))
        best[1] = min(best[1], max(o.t for o in chain))

    for o in opts:
        if o.kind == ONLY and all(n <= b for n, b in zip(o.counts, budgets)):
            score([o])

    def extend(chain, x, used):
        depth = len(chain)  # stages behind the next one
        for o in opts:
            if o.kind not in (INNER, FIRST) or min(o.amax, tab.L) < min(depth, tab.dcap):
                continue
            if o.xf >= 0 and o.xf != x:
                continue
            x2 = x + o.span
            if (o.kind == FIRST and x2 != tab.X) or (o.kind == INNER and (x2 > tab.X or o.span == 0)):
                continue
            u2 = [a + b for a, b in zip(used, o.counts)]
            if any(a > b for a, b in zip(u2, budgets)):
                continue
            if o.kind == FIRST:
                score(chain + [o])
            elif len(chain) < 3 * tab.X + 3:
                extend(chain + [o], x2, u2)

    for o in opts:
        if o.kind == LAST and all(n <= b for n, b in zip(o.counts, budgets)):
            extend([o], o.span, list(o.counts))
    return best[0], best[1]


@pytest.mark.parametrize("seed", range(40))
def test_program_matches_brute_force(seed):
    tab, budgets = random_table(seed)
    rng = np.random.default_rng(seed)
    for trial in range(3):
        use = np.ones(len(tab.options), dtype=bool) if trial == 0 else rng.random(len(tab.options)) < 0.7
        ref_sum, ref_btl = brute(tab, budgets, use)
        got, seq = min_stage_sum(tab, use)
        assert got == pytest.approx(ref_sum, rel=1e-12) if math.isfinite(ref_sum) else got == math.inf
        if seq is not None:
            assert sum(o.t for o in [tab.options[r] for r in seq]) == pytest.approx(got, rel=1e-12)
        assert min_bottleneck(tab, use) == (pytest.approx(ref_btl, rel=1e-12) if math.isfinite(ref_btl) else math.inf)
        if math.isfinite(ref_sum):  # a limit at the optimum: nothing below it
            assert min_stage_sum(tab, use, ref_sum)[0] == math.inf
            assert min_bottleneck(tab, use, ref_btl) == math.inf
            assert min_stage_sum(tab, use, ref_sum * 1.0001)[0] == pytest.approx(ref_sum, rel=1e-12)
            assert min_bottleneck(tab, use, ref_btl * 1.0001) == pytest.approx(ref_btl, rel=1e-12)


def test_instances_have_plans_and_both_kinds():
    found = [math.isfinite(brute(t, b, np.ones(len(t.options), dtype=bool))[0])
             for t, b in (random_table(s) for s in range(40))]
    assert sum(found) >= 20
    fixed = sum(any(o.xf > 0 for o in random_table(s)[0].options) for s in range(40))
    assert 5 <= fixed <= 35


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_a_work_cap_gives_up_or_answers_exactly(seed):
    """Past max_work the program gives up (-inf, no plan: not a proof); a cap it stays
    within does not change its answer."""
    tab, budgets = random_table(seed)
    use = np.ones(len(tab.options), dtype=bool)
    ref, _ = min_stage_sum(tab, use)
    meter = [0]
    min_stage_sum(tab, use, meter=meter)
    for cap in (0, meter[0] // 2):
        v, seq = min_stage_sum(tab, use, max_work=cap)
        assert (v, seq) == (-math.inf, None) or v == ref
    got, _ = min_stage_sum(tab, use, max_work=meter[0] + 1)
    assert got == ref
    gave_up = sum(min_stage_sum(t, np.ones(len(t.options), dtype=bool), max_work=0)[0] == -math.inf
                  for t, _ in (random_table(s) for s in range(40)))
    assert gave_up >= 10


@pytest.mark.parametrize("seed", range(0, 40, 2))
def test_priced_remaining_bound_holds_for_any_prices(seed):
    """With a finite limit the program prunes states by the budgets priced in the
    remaining bound (StageTable.multipliers): a lower bound for any device prices, so with
    arbitrary prices in place of the table's own the answer is still the brute force's."""
    tab, budgets = random_table(seed)
    use = np.ones(len(tab.options), dtype=bool)
    ref, _ = brute(tab, budgets, use)
    if not math.isfinite(ref):
        return
    rng = np.random.default_rng(seed)
    for lams in (tab.multipliers(), rng.uniform(0, 3, size=(4, len(budgets))), np.full((1, len(budgets)), 50.0)):
        tab._lams = lams
        assert min_stage_sum(tab, use, ref * 1.0001)[0] == pytest.approx(ref, rel=1e-12)
        assert min_stage_sum(tab, use, ref)[0] == math.inf
    tab._lams = None


def test_priced_prices_prune_work():
    """The table's own prices are found (positive somewhere) on tables where the budgets
    bind, and the pruning they allow never costs work."""
    priced = 0
    for seed in range(40):
        tab, budgets = random_table(seed)
        use = np.ones(len(tab.options), dtype=bool)
        ref, _ = min_stage_sum(tab, use)
        if not math.isfinite(ref):
            continue
        with_prices, without = [0], [0]
        min_stage_sum(tab, use, ref * 1.5, meter=with_prices)
        lams = tab.multipliers()
        tab._lams = np.zeros((0, len(budgets)))
        min_stage_sum(tab, use, ref * 1.5, meter=without)
        tab._lams = lams
        assert with_prices[0] <= without[0]
        priced += len(lams) > 0
    assert priced >= 5
