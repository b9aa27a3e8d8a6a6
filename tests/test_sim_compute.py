"""Shared compute slots (processor sharing) and interference of communication with
compute in the simulator (simulator.compute), with the end-of-step loss all-reduce and
the per-kind split of a step. Every expected number is worked out in the comments."""

from __future__ import annotations

import pytest

from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.evaluate import predict
from hetalloc.models import LayerShape
from hetalloc.plan import Group, Plan, Replica, Stage
from simulator import simulate
from simulator.engine import SimOptions, Simulation


def cluster(count: int, slots: int = 0, interference: float = 0.0, p2p: float = 0.0, comm_collective: float = 0.0,
            comm_p2p: float = 0.0):
    """`count` devices of type X on one node, links of 1 GB/s without latency."""
    node = {"name": "n", "gpus": [{"type": "X", "count": count}],
            "intra_link": {"bandwidth_gbps": 1.0, "latency_us": 0.0}}
    if slots:
        node["compute_slots"] = slots
    return cluster_from_dict({"name": "toy", "device_types": [
        {"name": "X", "peak_tflops": 1, "memory_gib": 100, "mem_bandwidth_gbps": 32,
         "interference_collective": interference, "interference_p2p": p2p,
         "comm_slowdown_collective": comm_collective, "comm_slowdown_p2p": comm_p2p}], "nodes": [node]})


def graph(num_layers: int = 1, fwd_s: float = 1.0, bwd_s: float = 2.0, params: int = 0,
          out_bytes: float = 0.5e9) -> CostGraph:
    layers = [LayerShape(f"l{i}", "block", params, 1.0, out_bytes, 1e6) for i in range(num_layers)]
    table = TimeTable([1], [[fwd_s]] * num_layers, [[bwd_s]] * num_layers)
    return CostGraph("toy", 1, "fp32", layers, tables={"X": table})


def plan(replicas, num_microbatches: int, schedule: str = "gpipe") -> Plan:
    reps = [Replica([Stage(a, b, [Group([d], s) for d, s in devs]) for a, b, devs in r]) for r in replicas]
    B = num_microbatches * sum(r.microbatch for r in reps)
    return Plan("toy", 1, B, num_microbatches, schedule, "ring", reps, precision="fp32")


def ops(res):
    return [(a.device, a.name, a.t0, a.t1) for a in res.activities if a.kind in ("F", "B")]


LOSS_2 = 8e-9  # the loss all-reduce among 2 devices: one round, 8 bytes / 1 GB/s


def test_two_replicas_on_one_slot_share_it():
    # Two one-stage replicas, fwd 1 s and bwd 2 s each, on a node with one compute slot:
    # both forwards run at half speed, [0, 2]; both backwards [2, 6]. Without sharing
    # they would end at 3. No parameters: no gradient all-reduce; then the loss all-reduce.
    c, cg = cluster(2, slots=1), graph()
    p = plan([[(0, 1, [("n/0", 1)])], [(0, 1, [("n/1", 1)])]], 1)
    res = Simulation(p, c, cg, SimOptions()).run()
    assert sorted(ops(res)) == [("n/0", "B mb0 L0-0", 2.0, 6.0), ("n/0", "F mb0 L0-0", 0.0, 2.0),
                                ("n/1", "B mb0 L0-0", 2.0, 6.0), ("n/1", "F mb0 L0-0", 0.0, 2.0)]
    assert res.iteration_ends_s == [pytest.approx(6.0 + LOSS_2)]
    # With a slot per device (or sharing off, as in the reference mode) each takes 3 s.
    alone = Simulation(p, cluster(2, slots=2), cg, SimOptions()).run()
    assert alone.iteration_ends_s == [pytest.approx(3.0 + LOSS_2)]
    off = Simulation(p, c, cg, SimOptions(shared_compute=False)).run()
    assert off.iteration_ends_s == [pytest.approx(3.0 + LOSS_2)]
    assert Simulation(p, c, cg, SimOptions(contention=False, overlap=False)).run().iteration_ends_s \
        == [pytest.approx(predict(p, c, cg).iteration_time_s)]


def test_a_pipeline_shares_only_while_both_stages_compute():
    # Two stages on one slot, GPipe, 2 micro-batches, sends of 0.5 s (0.5 GB at 1 GB/s) on
    # the p2p lane. Stage 0: F0 [0,1] (alone), send F0 [1,1.5]; F1 starts at 1 alone,
    # stage 1's F0 joins at 1.5: both at half speed. F1 has 0.5 s left at 1.5 -> ends at
    # 2.5; stage 1's F0 did 0.5 by then, does its last 0.5 alone -> 3.0. F1's send
    # [2.5,3.0]; stage 1 F1 [3,4] alone, B0 [4,6], B1 [6,8]; gradients reach stage 0 at
    # 6.5 and 8.5: stage 0 B0 [6.5,8.5] overlaps stage 1's B1 [6,8] from 6.5: both at
    # half speed from 6.5 until B1 ends: B1 had 1.5 s left at 6.5 -> 9.5; B0 did 1.5 by
    # 9.5, the rest (0.5) alone -> 10.0; B1 of stage 0 waits for its gradient, which
    # leaves stage 1 at 9.5 and arrives at 10.0: [10, 12].
    c, cg = cluster(2, slots=1), graph()
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2)
    cg = graph(num_layers=2)
    res = Simulation(p, c, cg, SimOptions()).run()
    assert ops(res) == [
        ("n/0", "F mb0 L0-0", 0.0, 1.0), ("n/0", "F mb1 L0-0", 1.0, 2.5), ("n/1", "F mb0 L1-1", 1.5, 3.0),
        ("n/1", "F mb1 L1-1", 3.0, 4.0), ("n/1", "B mb0 L1-1", 4.0, 6.0), ("n/1", "B mb1 L1-1", 6.0, 9.5),
        ("n/0", "B mb0 L0-0", 6.5, 10.0), ("n/0", "B mb1 L0-0", 10.0, 12.0)]
    assert res.iteration_ends_s == [pytest.approx(12.0 + LOSS_2)]


def test_compute_slows_while_its_collective_runs():
    # Two data-parallel devices, two layers of 1e9 fp32 parameters (4e9 bytes each, one
    # bucket per layer), fwd 0.5 s and bwd 2 s per layer, compute 2x slower beside a
    # collective (interference 1.0). Forward [0,1]; backward of layer 1 [1,3]; bucket L1
    # (ring of 2 at 1 GB/s: 4 s) runs [3,7] beside the backward of layer 0, which then
    # advances at half speed: 2 s of work end at 7. Bucket L0 [7,11]; optimizer
    # 2 * 2e9 * 16 / 32 GB/s = 2 s beside nothing: [11,13].
    c, cg = cluster(2, interference=1.0), graph(num_layers=2, fwd_s=0.5, bwd_s=2.0, params=10**9)
    p = plan([[(0, 2, [("n/0", 1)])], [(0, 2, [("n/1", 1)])]], 1)
    res = Simulation(p, c, cg, SimOptions(bucket_bytes=4e9)).run()
    assert [(a.t0, a.t1) for a in res.activities if a.device == "n/0" and a.kind == "B"] == [(1.0, 7.0)]
    assert sorted({(a.t0, a.t1) for a in res.activities if a.kind == "allreduce"}) == [(3.0, 7.0), (7.0, 11.0)]
    assert res.iteration_ends_s == [pytest.approx(13.0 + LOSS_2)]
    # without the interference figure (or with the effect off) the backward ends at 5
    res = Simulation(p, c, cg, SimOptions(bucket_bytes=4e9, interference=False)).run()
    assert [(a.t0, a.t1) for a in res.activities if a.device == "n/0" and a.kind == "B"] == [(1.0, 5.0)]


def test_sends_slow_the_compute_beside_them():
    # Two stages, one micro-batch, p2p interference 1.0. Stage 0: F [0,1], its send
    # [1,1.5]; nothing computes beside it on stage 0, but stage 1's F starts at 1.5 after
    # the send: alone. Then stage 1's B [2.5,4.5] and its send back [4.5,5.0] while
    # stage 1 computes nothing; stage 0's B [5,7]. So no op overlaps a transfer and the
    # times are those without interference: 7 s.
    c, cg = cluster(2, p2p=1.0), graph(num_layers=2)
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 1)
    res = Simulation(p, c, cg, SimOptions()).run()
    assert res.iteration_ends_s == [pytest.approx(7.0 + LOSS_2)]
    # Two micro-batches: stage 0's F1 [1,2] runs beside F0's send [1,1.5]: it advances at
    # half speed until 1.5 (0.25 s of work), then alone: ends at 2.25.
    p2 = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2)
    res = Simulation(p2, c, cg, SimOptions()).run()
    assert ops(res)[1] == ("n/0", "F mb1 L0-0", 1.0, 2.25)


def test_communication_slows_beside_compute():
    # The data-parallel case above with the effect the other way round: compute at full
    # speed, but a collective beside compute progresses 1 / (1 + 0.5) as fast. Bucket L1
    # (4 s of work) from 3 runs beside the backward of layer 0 [3,5]: 2 s at 2/3 pace
    # (4/3 s of work), then alone: the 8/3 s left end at 5 + 8/3 = 23/3. Bucket L0 (ready
    # at 5) waits for the lane, [23/3, 35/3], beside nothing; optimizer [35/3, 41/3];
    # the loss all-reduce.
    c, cg = cluster(2, comm_collective=0.5), graph(num_layers=2, fwd_s=0.5, bwd_s=2.0, params=10**9)
    p = plan([[(0, 2, [("n/0", 1)])], [(0, 2, [("n/1", 1)])]], 1)
    res = Simulation(p, c, cg, SimOptions(bucket_bytes=4e9)).run()
    assert sorted({(a.t0, a.t1) for a in res.activities if a.kind == "allreduce"}) == [
        (3.0, pytest.approx(23 / 3)), (pytest.approx(23 / 3), pytest.approx(35 / 3))]
    assert res.iteration_ends_s == [pytest.approx(41 / 3 + LOSS_2)]
    # A send beside its sender's next forward: two stages, two micro-batches, p2p 1.0.
    # F0's send (0.5 s of work) from 1 runs beside F1 [1,2] all along, at half pace: it
    # arrives at 2 (c x 0.5 s later), and stage 1's F0 runs [2,3].
    c, cg = cluster(2, comm_p2p=1.0), graph(num_layers=2)
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2)
    res = Simulation(p, c, cg, SimOptions()).run()
    assert ("n/1", "F mb0 L1-1", 2.0, 3.0) in ops(res)


def test_on_cpu_nodes_communication_meets_compute_only_when_every_core_computes():
    # The same send with the node's 2 cores declared (CPU ranks: communication runs on the
    # cores, a free core serves it untouched). Three micro-batches, GPipe. F0's send
    # [1,1.5] runs beside stage 0's F1 while stage 1 idles: a free core, no extra; stage
    # 1's F0 [1.5,2.5]. F1's send (0.5 s of work) from 2 runs while stage 0 computes F2
    # [2,3] and stage 1 computes F0 [1.5,2.5]: both cores busy until 2.5, at half pace
    # (0.25 s of work); then stage 1's F0 ends, a core is free, and the 0.25 s left run
    # at full speed: it arrives at 2.75, and stage 1's F1 runs [2.75,3.75].
    c, cg = cluster(2, slots=2, comm_p2p=1.0), graph(num_layers=2)
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 3)
    got = ops(Simulation(p, c, cg, SimOptions()).run())
    assert ("n/1", "F mb0 L1-1", 1.5, 2.5) in got and ("n/1", "F mb1 L1-1", 2.75, 3.75) in got


def test_the_step_splits_into_the_kinds_the_runtime_measures():
    # Two one-stage replicas on one slot (first test): 6 s of compute each (shared), no
    # waits, then the loss all-reduce; the kinds add up to the iteration.
    c, cg = cluster(2, slots=1), graph()
    p = plan([[(0, 1, [("n/0", 1)])], [(0, 1, [("n/1", 1)])]], 1)
    rep = simulate(p, c, cg, iterations=2)
    w = rep.devices["n/0"]["work_s"]
    assert w == pytest.approx({"compute": 6.0, "p2p": 0.0, "allreduce": 0.0, "optimizer": 0.0, "loss": LOSS_2,
                               "other": 0.0}, abs=1e-9)
    assert sum(w.values()) == pytest.approx(rep.iteration_time_s)
    # A measured overhead of 0.1 s per op and 0.2 s per step (a slot each): F 1.1, B 2.1,
    # optimizer 0 + 0.2; the split gives the overheads to 'other': 2 * 0.1 + 0.2.
    spec = c.to_dict()
    spec["device_types"][0].update(op_overhead_us=1e5, step_overhead_us=2e5)
    spec["nodes"][0]["compute_slots"] = 2
    rep = simulate(p, cluster_from_dict(spec), cg)
    w = rep.devices["n/1"]["work_s"]
    assert w == pytest.approx({"compute": 3.0, "p2p": 0.0, "allreduce": 0.0, "optimizer": 0.0, "loss": LOSS_2,
                               "other": 0.4}, abs=1e-9)
    assert rep.iteration_time_s == pytest.approx(3.4 + LOSS_2)


def test_shared_slots_run_at_the_nodes_efficiency_only_while_oversubscribed():
    # Three one-stage replicas, fwd 1 s and bwd 2 s each. Two slots at efficiency 0.75:
    # three ops at once advance at 2/3 x 0.75 = 0.5 each: the forwards end at 2, the
    # backwards at 6. Two replicas on two slots are not oversubscribed: full speed, 3 s.
    cg = graph()
    three = plan([[(0, 1, [(f"n/{k}", 1)])] for k in range(3)], 1)

    def run(count, p, slots, efficiency):
        c = cluster(count, slots=slots)
        c.nodes[0].share_efficiency = efficiency
        return Simulation(p, c, cg, SimOptions()).run()

    res = run(3, three, 2, 0.75)
    assert sorted(ops(res)) == sorted([(f"n/{k}", "F mb0 L0-0", 0.0, pytest.approx(2.0)) for k in range(3)]
                                      + [(f"n/{k}", "B mb0 L0-0", pytest.approx(2.0), pytest.approx(6.0))
                                         for k in range(3)])
    two = plan([[(0, 1, [(f"n/{k}", 1)])] for k in range(2)], 1)
    # (not shared: the two identical replicas are simulated as one)
    assert [t1 for *_, t1 in ops(run(2, two, 2, 0.75))] == pytest.approx([1.0, 3.0])
