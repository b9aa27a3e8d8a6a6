"""best_shares: the threshold search that places large micro-batches gives exactly the
one-sample-at-a-time greedy's shares (and so its min-max stage time), including on
measured tables whose times have plateaus."""

import random
from pathlib import Path

import numpy as np
import pytest

from allocator.problem import Problem, StageTimer, _greedy_shares, _threshold_shares
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import TimeTable, analytic_cost_graph
from hetalloc.models import get_model

EX = Path(__file__).parent.parent / "examples"


def _plateau_graph(cluster):
    """gpt2-small with measured-style tables: coarse, flat between some batch sizes."""
    cg = analytic_cost_graph(get_model("gpt2-small"), 256)
    tables = {}
    for t in cluster.type_counts():
        rows_f, rows_b = [], []
        for li in range(cg.num_layers):
            f = [1e-3 * (li % 3 + 1) * x for x in (1, 1, 3, 3, 9)]  # plateaus 1-2 and 4-8
            rows_f.append(f)
            rows_b.append([2 * v for v in f])
        tables[t] = TimeTable([1, 2, 4, 8, 16], rows_f, rows_b)
    return cg.with_tables(tables)


@pytest.mark.parametrize("cluster_file,model,seq", [("mix-64.yaml", "gpt3-1.3b", 2048),
                                                    ("fleet-1024.yaml", "gpt2-xl", 1024),
                                                    ("lab-16.yaml", None, 256)])
def test_threshold_shares_equal_the_greedy(cluster_file, model, seq):
    cluster = load_cluster(EX / cluster_file)
    cg = analytic_cost_graph(get_model(model), seq) if model else _plateau_graph(cluster)
    prob = Problem(cluster, cg, 2048)
    rng = random.Random(7)
    checked = 0
    for b in (49, 64, 257, 1000, 2048):
        timer = StageTimer(prob, b)
        for _ in range(80):
            i = rng.randrange(prob.L)
            j = rng.randrange(i + 1, prob.L + 1)
            counts = tuple(rng.choice([0, 1, 2, 3, 8]) for _ in prob.classes)
            if not any(counts) or sum(counts) > b:
                continue
            caps = {c.index: min(b, prob.kmem(c, i, j, 2)) for c in prob.classes if counts[c.index]}
            if min(caps.values()) < 1 or sum(counts[ci] * caps[ci] for ci in caps) < b:
                continue
            left = b - sum(counts)
            greedy = _greedy_shares(timer, prob.classes, i, j, counts, caps, left)
            assert _threshold_shares(timer, prob.classes, i, j, counts, caps, left) == greedy, (b, i, j, counts)
            assert sum(sum(v) for v in greedy.values()) == b
            checked += 1
    assert checked >= 30


def test_unit_time_forms_agree_to_the_bit():
    """StageTimer.time, .times (many ranges) and .share_times (many shares) are one set of
    terms (StageTimer._terms): the same value to the last bit, tensor-parallel units and
    recomputation included."""
    from allocator.api import plan_spaces, tp_degrees
    cluster = load_cluster(EX / "mix-64.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 2048)
    spaces = plan_spaces(cluster, cg, 64, tp_degrees(cluster, cg, "auto"), "auto")
    assert any(c.tp > 1 for p in spaces for c in p.classes)
    rng = random.Random(0)
    for prob in spaces:
        timer = StageTimer(prob, 16)
        for c in prob.classes:
            for rc in prob.recompute_options:
                for _ in range(6):
                    i = rng.randrange(prob.L)
                    j = rng.randrange(i + 1, prob.L + 1)
                    one = [timer.time(c, i, j, k, rc) for k in range(1, 17)]
                    assert timer.share_times(c, i, j, 16, rc).tolist() == one
                I = [rng.randrange(prob.L) for _ in range(8)]
                J = [rng.randrange(a + 1, prob.L + 1) for a in I]
                k = rng.randint(1, 16)
                assert timer.times(c, np.array(I), np.array(J), k, rc).tolist() == \
                    [timer.time(c, a, b, k, rc) for a, b in zip(I, J)]
                assert timer.share_matrix(c, np.array(I), np.array(J), 16, rc).T.tolist() == \
                    [timer.share_times(c, a, b, 16, rc).tolist() for a, b in zip(I, J)]


@pytest.mark.parametrize("cluster_file,model,seq,B", [("mix-64.yaml", "gpt3-1.3b", 2048, 512),
                                                      ("lab-16.yaml", "gpt2-xl", 1024, 64)])
def test_whole_budget_times_equal_one_range_at_a_time(cluster_file, model, seq, B):
    """allocator.columns.whole_budget_times (every range at once, the cheap bound's times)
    gives whole_budget_time's value for each range to the bit."""
    import math
    from allocator.api import plan_spaces, tp_degrees
    from allocator.columns import whole_budget_time, whole_budget_times
    from allocator.lagrange import stage_specs
    from allocator.shapes import block_range
    cluster = load_cluster(EX / cluster_file)
    cg = analytic_cost_graph(get_model(model), seq)
    for prob in plan_spaces(cluster, cg, B, tp_degrees(cluster, cg, "auto"), "auto")[:2]:
        budget = [c.count for c in prob.classes]
        ranges = [block_range(prob, k, l) for k, l in stage_specs(prob)]
        for M in (1, 4, 16):
            timer = StageTimer(prob, B // M)
            got = whole_budget_times(prob, timer, M, ranges, budget).tolist()
            assert got == [whole_budget_time(prob, timer, M, i, j, math.inf, budget) for i, j in ranges]
            assert any(math.isfinite(t) for t in got)


def test_column_memo_gives_the_columns_of_a_smaller_cap():
    """Shapes built from columns remembered under a larger time cap (ColumnMemo: the
    search's first pass for its second) equal shapes built afresh under the smaller cap,
    in the same order."""
    from allocator.api import plan_spaces, tp_degrees
    from allocator.columns import ColumnMemo
    from allocator.shapes import block_shapes
    cluster = load_cluster(EX / "mix-64.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 2048)
    prob = plan_spaces(cluster, cg, 512, tp_degrees(cluster, cg, "auto"), "auto")[0]
    for M in (16, 64):
        timer = StageTimer(prob, 512 // M)
        memo = ColumnMemo()
        wide = block_shapes(prob, timer, M, 4.0 / M, memo=memo)
        for cap in (3.0 / M, 2.6 / M, 4.0 / M):
            fresh = block_shapes(prob, StageTimer(prob, 512 // M), M, cap)
            assert block_shapes(prob, timer, M, cap, memo=memo) == fresh
            assert len(fresh) <= len(wide)
        assert len(block_shapes(prob, timer, M, 2.6 / M)) < len(wide)
