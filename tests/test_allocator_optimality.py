"""The planner's objective equals a brute-force enumeration of the same plan space.

30 random small instances (<= 8 devices of 2-3 types on 1-2 nodes, <= 12 layers of
random sizes, both schedules, tight and loose memory): allocator.search must return
a plan whose model objective equals the brute-force optimum within 1e-6 relative.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from allocator.problem import Problem, evaluate_counts
from allocator.search import search
from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import LayerShape, get_model

from bruteforce import brute_force  # noqa: E402

TYPES = ["A100-40G", "V100-16G", "T4", "L4", "RTX-3090"]
LINKS = ["NVLink3", "PCIe4", "PCIe3"]
NICS = ["IB-HDR", "Eth-25G", "Eth-10G"]


def random_instance(seed: int, n_types: tuple[int, ...] = (2, 3), n_nodes_choice: tuple[int, ...] = (1, 2)):
    rng = random.Random(seed)
    types = rng.sample(TYPES, rng.choice(n_types))
    n_nodes = rng.choice(n_nodes_choice)
    total = rng.randint(max(3, n_nodes), 8)
    nodes = []
    left = total
    for k in range(n_nodes):
        cnt = left if k == n_nodes - 1 else rng.randint(1, left - (n_nodes - 1 - k))
        left -= cnt
        gpus = {}
        node_types = rng.sample(types, min(len(types), rng.choice([1, 2])))
        if len(n_types) and min(n_types) >= 3:  # spread the types over the nodes
            node_types = [types[k % len(types)]] + ([types[(k + 1) % len(types)]] if rng.random() < 0.5 else [])
        for _ in range(cnt):
            t = rng.choice(node_types)
            gpus[t] = gpus.get(t, 0) + 1
        nodes.append({"name": f"n{k}", "gpus": [{"type": t, "count": c} for t, c in gpus.items()],
                      "intra_link": rng.choice(LINKS), "nic": rng.choice(NICS)})
    cluster = cluster_from_dict({"name": f"rand{seed}", "nodes": nodes})
    base = analytic_cost_graph(get_model("gpt2-medium"), 512)
    n_layers = rng.randint(4, 12 if total <= 5 else 8)
    # Random layer sizes (scaled copies of a real block) so ranges differ in cost.
    blk = base.layers[1]
    scale_mem = rng.choice([1.0, 10.0, 40.0])  # loose to tight memory
    layers = [replace(base.layers[0], params=int(base.layers[0].params * scale_mem / 10))]
    identical = (seed // 100) % 2 == 0  # identical blocks exercise the symmetry breaking of inner stages
    for i in range(n_layers - 2):
        f = 1.0 if identical else rng.uniform(0.3, 2.0)
        layers.append(LayerShape(f"block{i}", "block", int(blk.params * f * scale_mem), blk.fwd_flops * f,
                                 blk.out_act_bytes, blk.saved_act_bytes * f * scale_mem / 10))
    layers.append(replace(base.layers[-1], params=int(base.layers[-1].params * scale_mem / 10)))
    cg = replace(base, layers=layers, _cache={})
    B = rng.choice([4, 6, 8, 12])
    schedule = rng.choice(["gpipe", "1f1b"])
    return Problem(cluster, cg, B, schedule=schedule)


def feasible_instance(seed: int, min_types: int = 1, **kw):
    """The first feasible instance in a seed's sequence (memory can make one infeasible)
    with at least min_types device types."""
    for attempt in range(30):
        prob = random_instance(seed * 100 + attempt, **kw)
        if len({c.dtype.name for c in prob.classes}) < min_types:
            continue
        ref = brute_force(prob)
        if ref is not None:
            return prob, ref
    raise AssertionError(f"no feasible instance for seed {seed}")


@pytest.mark.parametrize("seed", range(30))
def test_planner_matches_brute_force(seed):
    assert_equals_brute_force(*feasible_instance(seed))


def assert_equals_brute_force(prob, ref):
    res = search(prob, time_limit=120, gap=1e-9)
    assert res.best is not None, "planner found no plan but brute force did"
    assert res.status == "optimal"
    got = evaluate_counts(prob, res.best).objective_s
    assert abs(got - ref.objective_s) <= 1e-6 * ref.objective_s, (got, ref.objective_s)
    # the proven bound is consistent with the optimum
    assert res.bound <= ref.objective_s * (1 + 1e-6)


MANY_TYPES = dict(n_types=(3, 4), n_nodes_choice=(2, 3, 4), min_types=3)


@pytest.mark.parametrize("seed", range(1000, 1012))
def test_planner_matches_brute_force_three_or_four_types(seed):
    """3-4 device types spread over 2-4 nodes (several classes per type, links that differ)."""
    prob, ref = feasible_instance(seed, **MANY_TYPES)
    assert len({c.dtype.name for c in prob.classes}) >= 3 and len(prob.cluster.nodes) >= 2
    assert_equals_brute_force(prob, ref)


def test_instances_exercise_the_plan_space():
    """The random instances are not all trivial: optima use pipelines, mixed stages
    and replicas, so the comparison above covers the interesting parts."""
    multi_stage = mixed = 0
    for seed in range(30):
        _, ref = feasible_instance(seed)
        merged = [sum(1 for n in s.counts if n) for s in ref.stages]
        multi_stage += len(ref.stages) > 1
        mixed += any(k > 1 for k in merged) or any(sum(s.counts) * ref.R > 1 for s in ref.stages)
    assert multi_stage >= 5 and mixed >= 5, (multi_stage, mixed)


def test_identical_blocks_are_detected():
    prob, _ = feasible_instance(0)
    assert prob.interchangeable_blocks
    prob, _ = feasible_instance(1)
    assert not prob.interchangeable_blocks


# ---- plan space v2: tensor-parallel units and per-stage recomputation ----------------------

def random_v2_instance(seed: int):
    """Nodes of 2, 4 or 8 devices of one or two types (tensor-parallel units fit them),
    blocks of a real GPT block scaled (they keep how they split and what recomputation
    keeps), memory from loose to tight so recomputation matters; one Problem per
    tensor-parallel degree the seed draws."""
    rng = random.Random(seed)
    types = rng.sample(TYPES, 2)
    nodes = []
    for k in range(rng.choice([1, 2])):
        per = rng.choice([2, 4]) if k else rng.choice([2, 4, 8])
        split = [types[0]] if rng.random() < 0.6 else types
        gpus = [{"type": t, "count": per // len(split)} for t in split]
        nodes.append({"name": f"n{k}", "gpus": gpus, "intra_link": rng.choice(LINKS), "nic": rng.choice(NICS)})
    cluster = cluster_from_dict({"name": f"v2rand{seed}", "nodes": nodes})
    base = analytic_cost_graph(get_model("gpt2-medium"), 512)
    scale = rng.choice([1.0, 20.0, 60.0, 120.0])
    act = rng.choice([1.0, 16.0, 64.0, 128.0])
    n_blocks = rng.randint(2, 5)
    blk = base.layers[1]
    layers = [replace(base.layers[0], params=int(base.layers[0].params * scale / 10))]
    for i in range(n_blocks):
        f = 1.0 if seed % 2 == 0 else rng.uniform(0.5, 1.5)
        layers.append(replace(blk, name=f"block{i}", params=int(blk.params * f * scale),
                              replicated_params=int(blk.replicated_params * f * scale), fwd_flops=blk.fwd_flops * f,
                              saved_act_bytes=blk.saved_act_bytes * act, replicated_act_bytes=blk.replicated_act_bytes * act))
    layers.append(replace(base.layers[-1], params=int(base.layers[-1].params * scale / 10)))
    cg = replace(base, layers=layers, _cache={})
    B = rng.choice([4, 8])
    schedule = rng.choice(["gpipe", "1f1b"])
    tp = rng.choice([2, 2, 4, 8])
    sharding = rng.choice(["none", "zero1"])
    return Problem(cluster, cg, B, schedule=schedule, tp=tp, recompute="auto", optimizer_sharding=sharding)


def feasible_v2_instance(seed: int):
    for attempt in range(40):
        prob = random_v2_instance(seed * 100 + attempt)
        if max(c.tp for c in prob.classes) < 2:
            continue
        ref = brute_force(prob)
        if ref is not None:
            return prob, ref
    raise AssertionError(f"no feasible instance for seed {seed}")


@pytest.mark.parametrize("seed", range(2000, 2032))
def test_planner_matches_brute_force_with_tp_units_and_recompute(seed):
    """32 instances whose device classes come in tensor-parallel units of 2-8 devices, whose
    stages may recompute, with or without zero1: the search equals the brute force (which
    takes each stage's fastest recomputation choice that fits)."""
    assert_equals_brute_force(*feasible_v2_instance(seed))


def test_v2_instances_use_tp_units_and_recompute():
    """The v2 instances are not trivial: some optima recompute some stage, and some would
    not fit without it; every instance's units are tensor-parallel groups; some use zero1,
    and in some of those it changes the optimum."""
    recomputing = needs_it = zero1 = zero1_matters = 0
    for seed in range(2000, 2032):
        prob, ref = feasible_v2_instance(seed)
        assert max(c.tp for c in prob.classes) >= 2
        best = search(prob, time_limit=120, gap=1e-9).best
        recomputing += any(s.recompute == "full" for s in best.stages)
        needs_it += brute_force(replace(prob, recompute="none")) is None
        if prob.zero1:
            zero1 += 1
            plain = brute_force(replace(prob, optimizer_sharding="none"))
            zero1_matters += plain is None or plain.objective_s > ref.objective_s * (1 + 1e-9)
    assert recomputing >= 5 and needs_it >= 2 and zero1 >= 8 and zero1_matters >= 3, \
        (recomputing, needs_it, zero1, zero1_matters)
