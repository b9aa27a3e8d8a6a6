"""The baselines: each one's plan fits, is scored by ``hetalloc.evaluate.predict``, is the best
of its own space (checked by brute force over that space on small instances), and does not
depend on the clock (work counters bound the searches; a deadline only makes them stop)."""

import math
from pathlib import Path

import pytest

import allocator.baselines as bl
from allocator import BASELINES, baseline_plan, make_plan
from allocator.baselines import Budget, BaselineStopped, ChainSearch, Units, best_of, node_tp_degree
from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import InfeasibleError
from hetalloc.evaluate import predict
from hetalloc.models import get_model
from hetalloc.plan import validate_plan

EX = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def lab():
    return load_cluster(EX / "lab-16.yaml")


@pytest.fixture(scope="module")
def mix():
    return load_cluster(EX / "mix-64.yaml")


def consumer_cluster():
    """Two nodes of 4 x 24 GB consumer GPUs on PCIe and 25 GbE."""
    return cluster_from_dict({"name": "consumer-8", "nodes": [
        {"name": "r4090", "count": 1, "gpus": [{"type": "RTX-4090", "count": 4}], "intra_link": "PCIe4",
         "nic": "Eth-25G"},
        {"name": "r3090", "count": 1, "gpus": [{"type": "RTX-3090", "count": 4}], "intra_link": "PCIe4",
         "nic": "Eth-25G"}]})


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_fits_and_is_scored_by_predict(name, mix):
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 1024)
    p = baseline_plan(name, mix, cg, 256)
    validate_plan(p, mix, cg, check_fingerprints=True)  # memory included
    assert p.planner == name
    assert p.predicted["iteration_time_s"] == pytest.approx(predict(p, mix, cg).iteration_time_s, rel=1e-12)


@pytest.mark.parametrize("name", ["even", "proportional", "megatron"])
def test_chain_baselines_are_the_best_of_their_space(name, lab):
    """Brute force: every configuration the chain search lists is scored exactly as predict
    scores its plan, and the one returned is the least of them."""
    cg = analytic_cost_graph(get_model("gpt2-medium"), 1024)
    B = 32
    t = node_tp_degree(lab, bl._tp_degrees(cg)) if name == "megatron" else 1
    search = ChainSearch(name, lab, cg, B, Units.of(lab, t, B * cg.num_layers), schedule="1f1b",
                         optimizer="adamw", grad_sync="ring", budget=Budget(name, 10**9),
                         proportional=name == "proportional",
                         recompute=("none", "full") if name == "megatron" else ("none",))
    cands = search.candidates()
    assert len(cands) >= 10
    times = []
    for c in cands:
        plan = c.build()
        exact = predict(plan, lab, cg).iteration_time_s
        assert c.evaluate() == pytest.approx(exact, rel=1e-9)
        assert c.bound <= exact * (1 + 1e-9)
        times.append(exact)
    best = best_of(list(cands), Budget(name, 10**9))
    assert best.evaluate() == pytest.approx(min(times), rel=1e-9)
    got = baseline_plan(name, lab, cg, B)
    assert got.predicted["iteration_time_s"] == pytest.approx(min(times), rel=1e-9)


def test_even_searches_every_microbatch_count(lab):
    """The old rule (M <= 8 x depth) hid this one: 4 pipelines of 2 with 128 micro-batches of 2."""
    cg = analytic_cost_graph(get_model("gpt2-xl"), 1024)
    p = baseline_plan("even", lab, cg, 1024)
    validate_plan(p, lab, cg)
    assert p.num_microbatches > 8 * len(p.replicas[0].stages)
    assert {len(r.stages) for r in p.replicas} == {2}


def test_megatron_recipe(mix):
    """TP = the node's GPUs (mix-64: nodes of 8, 8 and 4 -> 4), one group per stage, even layers,
    equal shares, no recomputation where the plan fits without it."""
    cg = analytic_cost_graph(get_model("llama2-7b"), 1024)
    p = baseline_plan("megatron", mix, cg, 512)
    groups = [g for r in p.replicas for s in r.stages for g in s.groups]
    assert {g.tp for g in groups} == {4}
    assert all(len(s.groups) == 1 for r in p.replicas for s in r.stages)
    assert len({g.share for g in groups}) == 1
    assert {s.recompute for r in p.replicas for s in r.stages} == {"none"}
    sizes = [s.stop - s.start for s in p.replicas[0].stages]
    assert max(sizes) - min(sizes) <= 1


def test_megatron_recomputes_only_when_needed():
    """Llama-2 7B at seq 4096 on 24 GB GPUs: one block's saved activations for one sample
    (~6.5 GB) do not fit without recomputation; megatron turns it on."""
    cl = consumer_cluster()
    cg = analytic_cost_graph(get_model("llama2-7b"), 4096)
    p = baseline_plan("megatron", cl, cg, 64)
    validate_plan(p, cl, cg)
    assert {s.recompute for r in p.replicas for s in r.stages} == {"full"}
    assert {g.tp for r in p.replicas for s in r.stages for g in s.groups} == {4}


def test_metis_recipe(mix):
    """One pipeline; stage sizes powers of two using every device; inside a stage the faster
    groups get larger shares; TP doubled where memory is short (Llama-2 13B on mix-64)."""
    cg = analytic_cost_graph(get_model("llama2-13b"), 2048)
    p = baseline_plan("metis", mix, cg, 512)
    validate_plan(p, mix, cg)
    assert len(p.replicas) == 1
    stages = p.replicas[0].stages
    sizes = [len(s.device_ids()) for s in stages]
    assert all(n & (n - 1) == 0 for n in sizes) and sum(sizes) == mix.num_devices
    assert max(g.tp for s in stages for g in s.groups) >= 2
    for s in stages:
        speed = {}
        for g in s.groups:
            speed.setdefault(mix.dtype(g.lead).peak_flops, set()).add(g.share)
        ranked = [max(speed[k]) for k in sorted(speed)]
        assert ranked == sorted(ranked)  # faster type, no smaller share


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_do_not_depend_on_the_clock(name, mix, monkeypatch):
    """Same request, same plan: with the default bound, with a tight work bound (the search is
    cut), and with a clock that runs 1000x fast (as on a loaded machine) and no deadline."""
    cg = analytic_cost_graph(get_model("gpt3-2.7b"), 1024)

    def outcome(work):
        try:
            return baseline_plan(name, mix, cg, 512, work=work).to_dict()
        except InfeasibleError as e:  # a tight bound may end the search before a fit: the same way each time
            return str(e)

    for work in (None, 20_000):
        first = outcome(work)
        real = bl.time.perf_counter
        monkeypatch.setattr(bl.time, "perf_counter", lambda: real() * 1000.0)
        again = outcome(work)
        monkeypatch.setattr(bl.time, "perf_counter", real)
        assert again == first
    assert isinstance(outcome(None), dict)


def test_work_bound_is_said_and_deadline_stops(mix):
    cg = analytic_cost_graph(get_model("gpt3-2.7b"), 1024)
    cut = baseline_plan("proportional", mix, cg, 512, work=5_000)
    assert any("work bound" in n for n in cut.notes)
    with pytest.raises(BaselineStopped):
        baseline_plan("metis", mix, cg, 512, deadline=bl.time.perf_counter() - 1.0)


def test_infeasible_baseline_says_so():
    cl = consumer_cluster()
    cg = analytic_cost_graph(get_model("llama2-70b"), 4096)
    with pytest.raises(InfeasibleError, match="even baseline found no configuration"):
        baseline_plan("even", cl, cg, 64)


def test_plan_notes_every_baseline(lab):
    cg = analytic_cost_graph(get_model("gpt2-medium"), 1024)
    plan = make_plan(lab, cg, 64, time_limit=10)
    for name in BASELINES:
        assert any(n.startswith(f"baseline {name}:") for n in plan.notes), plan.notes
    assert math.isfinite(plan.predicted["iteration_time_s"])
