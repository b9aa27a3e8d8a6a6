"""Plan format: validation errors name the field; JSON round trip; self-contained context."""

from pathlib import Path

import pytest

from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import SpecError
from hetalloc.evaluate import predict, slice_overlaps
from hetalloc.models import get_model
from hetalloc.plan import (DeviceShare, Plan, Replica, Stage, attach_context, load_plan, plan_context,
                           validate_plan)

EX = Path(__file__).parent.parent / "examples"


@pytest.fixture
def ctx():
    return load_cluster(EX / "lab-16.yaml"), analytic_cost_graph(get_model("gpt2-small"))


def two_stage(B=32, M=4):
    return Plan("gpt2-small", 1024, B, M, "1f1b", "ring", [Replica([
        Stage(0, 7, [DeviceShare("a100/0", 5), DeviceShare("a100/1", 3)]),
        Stage(7, 14, [DeviceShare("v100/0", 8)])])])


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
    (lambda p: setattr(p.replicas[0].stages[1].devices[0], "device", "a100/0"), "used twice"),
    (lambda p: setattr(p.replicas[0].stages[0].devices[0], "share", 0), "devices[0].share"),
    (lambda p: setattr(p, "global_batch", 30), "global_batch: 30 != num_microbatches"),
    (lambda p: setattr(p.replicas[0].stages[1].devices[0], "share", 7), "shares sum to 7"),
    (lambda p: setattr(p.replicas[0].stages[1].devices[0], "device", "v100/9"), "not in cluster"),
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
    p = Plan("gpt2-xl", 1024, 64, 1, "gpipe", "ring", [Replica([Stage(0, 50, [DeviceShare("v100/0", 64)])])],
             precision=big.precision)
    with pytest.raises(SpecError, match="needs .* GiB, V100-16G has"):
        validate_plan(p, cluster, big)


def test_slice_overlaps():
    # shares 5:3 feeding 2:6 -> pieces (0,0,2), (0,1,3), (1,1,3)
    assert slice_overlaps([5, 3], [2, 6]) == [(0, 0, 2), (0, 1, 3), (1, 1, 3)]
    assert slice_overlaps([4], [1, 3]) == [(0, 0, 1), (0, 1, 3)]
