"""Hand-checkable timelines of the simulator: tiny pipelines, a ring all-reduce, shared
links, DDP buckets, memory. Every expected number is worked out in the comments."""

from __future__ import annotations

import pytest
import simpy

from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.costs import in_flight_microbatches
from hetalloc.evaluate import predict
from hetalloc.plan import device_memory
from hetalloc.models import LayerShape
from hetalloc.plan import Group, Plan, Replica, Stage
from simulator.collectives import buckets, ring_steps, split_steps
from simulator.engine import SimOptions, Simulation
from simulator.links import LinkLog, Network, Topology, UsageTable, max_min_rates
from simulator import simulate


def toy_cluster(nodes: dict[str, int], intra_gbps: float = 1.0, nic_gbps: float = 1.0, latency_us: float = 0.0,
                mem_gbps: float = 32.0):
    """Devices of type X (1 TFLOP/s, 100 GiB, `mem_gbps` memory bandwidth)."""
    spec = {"name": "toy",
            "device_types": [{"name": "X", "peak_tflops": 1, "memory_gib": 100, "mem_bandwidth_gbps": mem_gbps}],
            "nodes": [{"name": n, "gpus": [{"type": "X", "count": c}],
                       "intra_link": {"bandwidth_gbps": intra_gbps, "latency_us": latency_us},
                       **({"nic": {"bandwidth_gbps": nic_gbps, "latency_us": latency_us}} if len(nodes) > 1 else {})}
                      for n, c in nodes.items()]}
    return cluster_from_dict(spec)


def toy_graph(num_layers: int = 2, fwd_s: float = 1.0, bwd_s: float = 2.0, out_bytes: float = 0.5e9,
              params: int = 0, saved_bytes: float = 1e6) -> CostGraph:
    """fp32 layers that take fwd_s / bwd_s per sample on X (linear in the share)."""
    layers = [LayerShape(f"l{i}", "block", params, 1.0, out_bytes, saved_bytes) for i in range(num_layers)]
    table = TimeTable([1], [[fwd_s]] * num_layers, [[bwd_s]] * num_layers)
    return CostGraph("toy", 1, "fp32", layers, tables={"X": table})


LOSS_2 = 8 / 1e9
"""The end-of-step loss all-reduce among 2 devices over 1 GB/s links without latency:
one round of recursive doubling, 8 bytes / 1 GB/s = 8 ns (after the last optimizer step)."""


def toy_plan(replicas: list[list[tuple[int, int, list[tuple[str, int]]]]], num_microbatches: int, schedule: str,
             grad_sync: str = "ring") -> Plan:
    reps = [Replica([Stage(a, b, [Group([d], s) for d, s in devs]) for a, b, devs in r]) for r in replicas]
    B = num_microbatches * sum(r.microbatch for r in reps)
    return Plan("toy", 1, B, num_microbatches, schedule, grad_sync, reps, precision="fp32")


def timeline(plan, cl, cg, **opts):
    res = Simulation(plan, cl, cg, SimOptions(**opts)).run()
    return [(a.device, a.name, a.t0, a.t1) for a in res.activities if a.lane != "collective"], res


TWO_STAGES = [[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]]


def test_gpipe_two_stages_two_microbatches_blocking_sends():
    # fwd 1 s, bwd 2 s per stage; each activation / gradient slice is 0.5 GB over 1 GB/s = 0.5 s.
    # Without overlap a send blocks its op, and the receiver waits for the whole op.
    cl, cg = toy_cluster({"n": 2}), toy_graph()
    plan = toy_plan(TWO_STAGES, 2, "gpipe")
    log, res = timeline(plan, cl, cg, contention=False, overlap=False)
    assert log == [
        ("n/0", "F mb0 L0-0", 0.0, 1.0), ("n/0", "F mb0 -> n/1", 1.0, 1.5),
        ("n/0", "F mb1 L0-0", 1.5, 2.5), ("n/1", "F mb0 L1-1", 1.5, 2.5),
        ("n/0", "F mb1 -> n/1", 2.5, 3.0), ("n/1", "F mb1 L1-1", 3.0, 4.0),
        ("n/1", "B mb0 L1-1", 4.0, 6.0), ("n/1", "B mb0 -> n/0", 6.0, 6.5),
        ("n/1", "B mb1 L1-1", 6.5, 8.5), ("n/0", "B mb0 L0-0", 6.5, 8.5),
        ("n/1", "B mb1 -> n/0", 8.5, 9.0), ("n/0", "B mb1 L0-0", 9.0, 11.0),
        ("n/1", "optimizer step", 11.0, 11.0), ("n/0", "optimizer step", 11.0, 11.0),
    ]
    assert res.iteration_ends_s == [11.0 + LOSS_2] == [predict(plan, cl, cg).iteration_time_s]


def test_1f1b_two_stages_two_microbatches_blocking_sends():
    # Stage 0 warms up with 2 forwards, stage 1 with 1; then one backward, one forward.
    cl, cg = toy_cluster({"n": 2}), toy_graph()
    plan = toy_plan(TWO_STAGES, 2, "1f1b")
    log, res = timeline(plan, cl, cg, contention=False, overlap=False)
    assert log == [
        ("n/0", "F mb0 L0-0", 0.0, 1.0), ("n/0", "F mb0 -> n/1", 1.0, 1.5),
        ("n/0", "F mb1 L0-0", 1.5, 2.5), ("n/1", "F mb0 L1-1", 1.5, 2.5),
        ("n/0", "F mb1 -> n/1", 2.5, 3.0), ("n/1", "B mb0 L1-1", 2.5, 4.5),
        ("n/1", "B mb0 -> n/0", 4.5, 5.0), ("n/1", "F mb1 L1-1", 5.0, 6.0),
        ("n/0", "B mb0 L0-0", 5.0, 7.0), ("n/1", "B mb1 L1-1", 6.0, 8.0),
        ("n/1", "B mb1 -> n/0", 8.0, 8.5), ("n/0", "B mb1 L0-0", 8.5, 10.5),
        ("n/1", "optimizer step", 10.5, 10.5), ("n/0", "optimizer step", 10.5, 10.5),
    ]
    assert res.iteration_ends_s == [10.5 + LOSS_2] == [predict(plan, cl, cg).iteration_time_s]


def test_gpipe_and_1f1b_with_async_sends():
    # With overlap, sends run on the p2p lane while compute goes on; a receiver waits only
    # for its own slice. GPipe: stage 0 computes F0 [0,1] F1 [1,2], sends F0 [1,1.5] F1 [2,2.5];
    # stage 1: F0 [1.5,2.5] F1 [2.5,3.5] B0 [3.5,5.5] B1 [5.5,7.5]; its gradients arrive at
    # stage 0 at 6.0 and 8.0, so stage 0 runs B0 [6,8] B1 [8,10].
    cl, cg = toy_cluster({"n": 2}), toy_graph()
    log, res = timeline(toy_plan(TWO_STAGES, 2, "gpipe"), cl, cg, contention=True, overlap=True)
    compute = [x for x in log if "->" not in x[1] and "optimizer" not in x[1]]
    assert compute == [
        ("n/0", "F mb0 L0-0", 0.0, 1.0), ("n/0", "F mb1 L0-0", 1.0, 2.0), ("n/1", "F mb0 L1-1", 1.5, 2.5),
        ("n/1", "F mb1 L1-1", 2.5, 3.5), ("n/1", "B mb0 L1-1", 3.5, 5.5), ("n/1", "B mb1 L1-1", 5.5, 7.5),
        ("n/0", "B mb0 L0-0", 6.0, 8.0), ("n/0", "B mb1 L0-0", 8.0, 10.0),
    ]
    assert res.iteration_ends_s == [10.0 + LOSS_2]
    # 1F1B: stage 1 runs F0 [1.5,2.5] B0 [2.5,4.5] F1 [4.5,5.5] B1 [5.5,7.5]; stage 0 gets
    # gradient 0 at 5.0 and gradient 1 at 8.0.
    log, res = timeline(toy_plan(TWO_STAGES, 2, "1f1b"), cl, cg, contention=True, overlap=True)
    stage0 = [x[2:] for x in log if x[0] == "n/0" and x[1].startswith("B")]
    assert stage0 == [(5.0, 7.0), (8.0, 10.0)]
    assert res.iteration_ends_s == [10.0 + LOSS_2]


def test_four_device_ring_allreduce_step_by_step():
    # Four data-parallel devices on one node, links 1 GB/s with 1 µs latency. Each holds
    # 1e9 fp32 parameters = 4e9 bytes of gradients; the ring moves 4e9/4 = 1e9 bytes per hop
    # per step: 1 µs + 1 s. Compute ends at 3 s (fwd 1 + bwd 2); 3 reduce-scatter and 3
    # all-gather steps follow, then the optimizer (2 * 1e9 * 16 bytes / 32 GB/s = 1 s), then
    # the loss all-reduce by recursive doubling: log2(4) * (1 µs + 8 bytes / 1 GB/s) = 2.016 µs.
    cl = toy_cluster({"n": 4}, latency_us=1.0)
    cg = toy_graph(num_layers=1, params=10**9)
    plan = toy_plan([[(0, 1, [(f"n/{i}", 1)])] for i in range(4)], 1, "gpipe")
    res = Simulation(plan, cl, cg, SimOptions(contention=True, overlap=False)).run()
    (c,) = res.collectives
    step = 1e-6 + 1.0
    assert [p for p, _, _ in c.steps] == ["reduce-scatter"] * 3 + ["all-gather"] * 3
    assert [t1 for _, _, t1 in c.steps] == pytest.approx([3.0 + k * step for k in range(1, 7)], rel=1e-12)
    assert res.iteration_ends_s == pytest.approx([3.0 + 6 * step + 1.0 + 2.016e-6], rel=1e-12)
    # the same as the shared ring formula: 2(n-1)/n * bytes / bw + 2(n-1) * latency
    assert res.iteration_ends_s[0] == pytest.approx(predict(plan, cl, cg).iteration_time_s, rel=1e-12)


def _run_flows(topo: Topology, flows: list[tuple[str, str, float]]) -> list[float]:
    env = simpy.Environment()
    table = UsageTable()
    net = Network(env, topo, LinkLog())
    ends: list[float] = []

    def one(a, b, nbytes):
        yield net.transfer(table.of_paths([topo.path(a, b)]), nbytes)
        ends.append(env.now)

    usages = [table.of_paths([topo.path(a, b)]) for a, b, _ in flows]
    table.reduce(topo.capacity)
    assert all(u.reduced for u in usages)
    for a, b, nbytes in flows:
        env.process(one(a, b, nbytes))
    env.run()
    return ends


def test_two_transfers_sharing_a_link_take_twice_as_long():
    # Two nodes with 1 GB/s NICs and fast NVLink-like intra links: a transfer of 1e9 bytes
    # from node a to node b takes 1 s alone; two at once share a's NIC and take 2 s each.
    topo = Topology(toy_cluster({"a": 2, "b": 2}, intra_gbps=100.0, nic_gbps=1.0))
    assert _run_flows(topo, [("a/0", "b/0", 1e9)]) == [1.0]
    assert _run_flows(topo, [("a/0", "b/0", 1e9), ("a/1", "b/1", 1e9)]) == [2.0, 2.0]
    # Processor sharing, not first come first served: a 1 GB and a 3 GB transfer share the
    # NIC at 0.5 GB/s each until the first ends at 2 s; the second then gets the whole NIC
    # for its remaining 2 GB and ends at 4 s.
    assert _run_flows(topo, [("a/0", "b/0", 1e9), ("a/1", "b/1", 3e9)]) == [2.0, 4.0]
    # Transfers on disjoint links do not slow each other.
    assert _run_flows(topo, [("a/0", "a/1", 50e9), ("b/0", "b/1", 50e9)]) == [0.5, 0.5]


def test_max_min_gives_unused_share_to_others():
    # Links 0 (cap 10) and 1 (cap 4). Flow A crosses both, flow B only link 0, flow C only
    # link 1. Link 1 is the tighter: A and C get 2 each; B takes the rest of link 0: 8.
    table = UsageTable()
    a, b, c = table.get({0: 1, 1: 1}, "A"), table.get({0: 1}, "B"), table.get({1: 1}, "C")
    rates = max_min_rates([a, b, c], [1, 1, 1], [10.0, 4.0])
    assert [r for r, _ in rates] == [2.0, 8.0, 2.0]
    assert [l for _, l in rates] == [1, 0, 1]
    # multiplicity: three copies of C on link 1 leave A a quarter of it
    rates = max_min_rates([a, c], [1, 3], [10.0, 4.0])
    assert [r for r, _ in rates] == [1.0, 1.0]


def test_pipeline_sends_share_a_nic():
    # Stage 0 has two devices on node a (one sample each), stage 1 one device on node b.
    # Both forward slices (0.5 GB) leave node a at t=1 through its 1 GB/s NIC: alone each
    # would take 0.5 s; sharing, both take 1 s.
    cl = toy_cluster({"a": 2, "b": 1}, intra_gbps=100.0, nic_gbps=1.0)
    plan = toy_plan([[(0, 1, [("a/0", 1), ("a/1", 1)]), (1, 2, [("b/0", 2)])]], 1, "gpipe")
    cg = toy_graph()
    for contention, end in ((False, 1.5), (True, 2.0)):
        log, _ = timeline(plan, cl, cg, contention=contention, overlap=True)
        sends = [(d, t0, t1) for d, name, t0, t1 in log if name.startswith("F mb0 ->")]
        assert sends == [("a/0", 1.0, end), ("a/1", 1.0, end)]


def test_ddp_buckets_start_during_backward():
    # Two data-parallel devices, two layers of 1e9 fp32 parameters (4e9 bytes of gradients
    # each, one bucket per layer). Backward runs layer 1 [1,3] then layer 0 [3,5]. Ring of 2
    # devices at 1 GB/s: 2 steps of 2e9 bytes = 4 s per bucket. Bucket L1 runs [3,7], bucket
    # L0 waits for the lane [7,11]; optimizer (2 * 2e9 * 16 / 64 GB/s = 1 s) ends at 12, the
    # loss all-reduce 8 ns later.
    cl = toy_cluster({"n": 2}, mem_gbps=64.0)
    cg = toy_graph(num_layers=2, fwd_s=0.5, bwd_s=2.0, params=10**9)
    plan = toy_plan([[(0, 2, [(f"n/{i}", 1)])] for i in range(2)], 1, "gpipe")
    res = Simulation(plan, cl, cg, SimOptions(contention=True, overlap=True, bucket_bytes=4e9)).run()
    spans = [(c.bucket.start, c.bucket.stop, c.done.value[1]) for c in res.collectives]
    assert spans == [(1, 2, 7.0), (0, 1, 11.0)]
    starts = sorted({(a.t0, a.t1) for a in res.activities if a.kind == "allreduce"})
    assert starts == [(3.0, 7.0), (7.0, 11.0)]
    assert res.iteration_ends_s == [12.0 + LOSS_2]
    # Without overlap: one all-reduce of 8e9 bytes after the backward (5 s): 8 s, then 1 s.
    res = Simulation(plan, cl, cg, SimOptions(contention=True, overlap=False)).run()
    assert res.iteration_ends_s == [14.0 + LOSS_2] == [predict(plan, cl, cg).iteration_time_s]


def test_bucket_split_covers_group_bytes():
    cg = toy_graph(num_layers=5, params=10)  # 40 bytes of fp32 gradients per layer
    bs = buckets(0, 0, 5, cg, "fp32", 100)
    assert [(b.start, b.stop, b.nbytes) for b in bs] == [(3, 5, 80), (1, 3, 80), (0, 1, 40)]
    big = buckets(0, 0, 2, toy_graph(num_layers=2, params=100), "fp32", 150)  # 400 bytes a layer
    assert [(b.start, b.stop, b.nbytes) for b in big] == [(1, 2, 400 / 3)] * 3 + [(0, 1, 400 / 3)] * 3
    assert split_steps(7, 3) == [3, 2, 2] and split_steps(2, 32) == [1, 1]


def test_ring_steps_merge_beyond_the_limit_with_the_same_total():
    cl = toy_cluster({"n": 8}, latency_us=2.0)
    topo = Topology(cl)
    devs = [d.id for d in cl.devices]
    exact = ring_steps(topo, UsageTable(), devs, 64)
    merged = ring_steps(topo, UsageTable(), devs, 4)
    assert len(exact) == 14 and len(merged) == 4
    assert sum(s.latency_s for s in merged) == pytest.approx(sum(s.latency_s for s in exact))
    assert sum(f for s in merged for _, f in s.flows) == pytest.approx(sum(f for s in exact for _, f in s.flows))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_peak_memory_matches_the_formula(schedule):
    # Four stages, eight micro-batches: GPipe holds all 8 micro-batches of activations,
    # 1F1B holds S - s on stage s; the simulated peak equals hetalloc.costs' memory.
    cl, cg = toy_cluster({"n": 4}), toy_graph(num_layers=4, params=1000)
    plan = toy_plan([[(i, i + 1, [(f"n/{i}", 1)]) for i in range(4)]], 8, schedule)
    rep = simulate(plan, cl, cg)
    formula = device_memory(plan, cl, cg)
    for i in range(4):
        d = rep.devices[f"n/{i}"]
        assert d["peak_activation_microbatches"] == in_flight_microbatches(schedule, i, 4, 8)
        assert d["peak_memory_bytes"] == pytest.approx(formula[f"n/{i}"].total, rel=1e-12)
        timeline = rep.memory_timeline(f"n/{i}")
        assert max(b for _, b in timeline) == pytest.approx(d["peak_memory_bytes"], rel=1e-12)
        assert timeline[-1][1] == timeline[0][1]  # every micro-batch's activations are freed


@pytest.mark.parametrize("nodes", [{"a": 4, "b": 4}, {"a": 4, "b": 2, "c": 1}, {"a": 8}])
@pytest.mark.parametrize("algorithm", ["ring", "hierarchical", "param_server"])
def test_collectives_over_the_links_alone_equal_the_formulas(nodes, algorithm):
    # Data parallel over every device, 4e9 bytes of gradients, NICs 10 GB/s, intra 100 GB/s,
    # 5 µs everywhere: the step-by-step collective with link sharing on, but nothing else
    # running, takes exactly hetalloc.costs' time for the algorithm.
    cl = toy_cluster(nodes, intra_gbps=100.0, nic_gbps=10.0, latency_us=5.0)
    cg = toy_graph(num_layers=1, params=10**9)
    plan = toy_plan([[(0, 1, [(d.id, 1)])] for d in cl.devices], 1, "gpipe", algorithm)
    sim = simulate(plan, cl, cg, contention=True, overlap=False, compare=False).iteration_time_s
    assert sim == pytest.approx(predict(plan, cl, cg).iteration_time_s, rel=1e-12)
