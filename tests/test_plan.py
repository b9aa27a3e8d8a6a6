"""Plan format: validation errors name the field; JSON round trip; self-contained context."""

import json
from pathlib import Path

import pytest

from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import SpecError
from hetalloc.evaluate import predict, slice_overlaps
from hetalloc.models import get_model
from hetalloc.plan import (Group, Plan, Replica, Stage, attach_context, load_plan, plan_context,
                           validate_plan)

EX = Path(__file__).parent.parent / "examples"


@pytest.fixture
def ctx():
    return load_cluster(EX / "lab-16.yaml"), analytic_cost_graph(get_model("gpt2-small"))


def two_stage(B=32, M=4):
    return Plan("gpt2-small", 1024, B, M, "1f1b", "ring", [Replica([
        Stage(0, 7, [Group(["a100/0"], 5), Group(["a100/1"], 3)]),
        Stage(7, 14, [Group(["v100/0"], 8)])])])


def test_valid_plan_round_trip(ctx, tmp_path):
    cluster, cg = ctx
    p = attach_context(two_stage(), cluster, cg)
    validate_plan(p, cluster, cg, check_fingerprints=True)
    p.predicted = predict(p, cluster, cg).to_dict()
    p.save(tmp_path / "p.json")
    q = load_plan(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    c2, cg2 = plan_context(q)
    assert c2.fingerprint() == cluster.fingerprint() and cg2.fingerprint() == cg.fingerprint()


@pytest.mark.parametrize("mutate, where", [
    (lambda p: setattr(p.replicas[0].stages[1], "start", 8), "stages[1].layers"),
    (lambda p: setattr(p.replicas[0].stages[1].groups[0], "devices", ["a100/0"]), "used twice"),
    (lambda p: setattr(p.replicas[0].stages[0].groups[0], "share", 0), "groups[0].share"),
    (lambda p: setattr(p, "global_batch", 30), "global_batch: 30 != num_microbatches"),
    (lambda p: setattr(p.replicas[0].stages[1].groups[0], "share", 7), "shares sum to 7"),
    (lambda p: setattr(p.replicas[0].stages[1].groups[0], "devices", ["v100/9"]), "not in cluster"),
    (lambda p: setattr(p, "schedule", "zb"), "schedule: unknown schedule"),
    (lambda p: setattr(p.replicas[0].stages[1], "stop", 13), "cover layers 0..12"),
])
def test_validation_errors(ctx, mutate, where):
    cluster, cg = ctx
    p = two_stage()
    mutate(p)
    with pytest.raises(SpecError) as e:
        validate_plan(p, cluster, cg)
    assert where in str(e.value)


def test_memory_overflow_is_reported(ctx):
    cluster, cg = ctx
    big = analytic_cost_graph(get_model("gpt2-xl"))
    p = Plan("gpt2-xl", 1024, 64, 1, "gpipe", "ring", [Replica([Stage(0, 50, [Group(["v100/0"], 64)])])],
             precision=big.precision)
    with pytest.raises(SpecError, match="needs .* GiB, V100-16G has"):
        validate_plan(p, cluster, big)


def test_slice_overlaps():
    # shares 5:3 feeding 2:6 -> pieces (0,0,2), (0,1,3), (1,1,3)
    assert slice_overlaps([5, 3], [2, 6]) == [(0, 0, 2), (0, 1, 3), (1, 1, 3)]
    assert slice_overlaps([4], [1, 3]) == [(0, 0, 1), (0, 1, 3)]


# ---- schema 2: tensor-parallel groups, recomputation, optimizer sharding ------------------

def tp_plan(B=32, M=4):
    """Stage 0: a 4-way A100 group (share 6) next to a 2-way V100 group (share 2);
    stage 1: one V100 (share 8), recomputed; optimizer state sharded."""
    return Plan("gpt2-small", 1024, B, M, "1f1b", "ring", [Replica([
        Stage(0, 7, [Group(["a100/0", "a100/1", "a100/2", "a100/3"], 6), Group(["v100/0", "v100/1"], 2)]),
        Stage(7, 14, [Group(["v100/2"], 8)], recompute="full")])], optimizer_sharding="zero1")


def test_schema2_round_trip_and_views(ctx, tmp_path):
    cluster, cg = ctx
    p = attach_context(tp_plan(), cluster, cg)
    validate_plan(p, cluster, cg, check_fingerprints=True)
    p.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["schema_version"] == 2 and d["optimizer_sharding"] == "zero1"
    assert d["replicas"][0]["stages"][1] == {"layers": [7, 14], "recompute": "full",
                                              "groups": [{"devices": ["v100/2"], "share": 8}]}
    q = load_plan(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    assert [g.tp for g in q.replicas[0].stages[0].groups] == [4, 2]
    assert q.placement()["a100/3"] == (0, 0) and q.group_of()["v100/1"].lead == "v100/0"
    assert q.options_used() == ["tensor parallelism (t = 2, 4)", "activation recomputation",
                                "optimizer sharding (zero1)"]
    assert two_stage().options_used() == []


def test_schema1_plans_still_load(ctx, tmp_path):
    cluster, cg = ctx
    p = attach_context(two_stage(), cluster, cg)
    v1 = p.to_dict()
    v1["schema_version"] = 1
    del v1["optimizer_sharding"]
    for r in v1["replicas"]:
        for s in r["stages"]:
            del s["recompute"]
            s["devices"] = [{"id": g["devices"][0], "share": g["share"]} for g in s.pop("groups")]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    q = load_plan(tmp_path / "v1.json")
    assert q.to_dict() == p.to_dict()  # each device a group of one, recompute none, no sharding
    validate_plan(q, cluster, cg, check_fingerprints=True)


@pytest.mark.parametrize("mutate, where", [
    (lambda p: p.replicas[0].stages[0].groups[0].devices.pop(), "groups[0].devices: 3 devices; a tensor-parallel"),
    (lambda p: setattr(p.replicas[0].stages[0].groups[1], "devices", ["v100/0", "a100/4"]),
     "groups[1].devices[1]: 'a100/4' is on node 'a100', rank 0 'v100/0' on 'v100'"),
    (lambda p: setattr(p.replicas[0].stages[1], "recompute", "selective"), "stages[1].recompute: unknown choice"),
    (lambda p: setattr(p, "optimizer_sharding", "zero3"), "optimizer_sharding: unknown choice 'zero3'"),
    (lambda p: setattr(p.replicas[0].stages[1].groups[0], "devices", ["a100/1"]), "'a100/1' is used twice"),
])
def test_schema2_validation_errors(ctx, mutate, where):
    cluster, cg = ctx
    p = tp_plan()
    mutate(p)
    with pytest.raises(SpecError) as e:
        validate_plan(p, cluster, cg, check_memory=False)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_tp_group_needs_one_type_and_a_graph_that_says_how_layers_split(ctx):
    from hetalloc.cluster import cluster_from_dict
    cluster, cg = ctx
    mixed = cluster_from_dict({"name": "mixed", "nodes": [{"name": "n", "intra_link": "PCIe4",
                                                           "gpus": [{"type": "A100-80G", "count": 1},
                                                                    {"type": "L4", "count": 1}]}]})
    p = Plan("gpt2-small", 1024, 4, 1, "1f1b", "ring", [Replica([Stage(0, 14, [Group(["n/0", "n/1"], 4)])])])
    with pytest.raises(SpecError, match=r"groups\[0\].devices\[1\]: 'n/1' is a L4, rank 0 'n/0' a A100-80G"):
        validate_plan(p, mixed, cg, check_memory=False)
    d = cg.to_dict()
    d["layers"] = [{k: l[k] for k in ("name", "kind", "params", "fwd_flops", "out_act_bytes", "saved_act_bytes")}
                   for l in d["layers"]]
    from hetalloc.costgraph import cost_graph_from_dict
    old = cost_graph_from_dict(d)
    with pytest.raises(SpecError, match="does not say how its layers split .* re-run 'hetalloc profile'"):
        validate_plan(tp_plan(), cluster, old, check_memory=False)
    validate_plan(two_stage(), cluster, old, check_memory=False)  # schema-1 plans are fine on it
