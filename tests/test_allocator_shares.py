"""best_shares: the threshold search that places large micro-batches gives exactly the
one-sample-at-a-time greedy's shares (and so its min-max stage time), including on
measured tables whose times have plateaus."""

import random
from pathlib import Path

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
