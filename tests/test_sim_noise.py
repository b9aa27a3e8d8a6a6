"""Step-to-step compute noise in the simulator (SimOptions.noise, DeviceType.compute_noise),
the extra compute per op (DeviceType.op_compute_us), and the profile's fits of both from
its training runs (runtime.profile.overhead). Expected numbers are worked out in the
comments from the engine's own draws."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from hetalloc.cluster import cluster_from_dict
from runtime.profile.overhead import collective_extra, fit_compute, log_quantiles, log_spread, own_variation
from simulator import simulate
from simulator.engine import SimOptions, Simulation

from test_sim_compute import LOSS_2, graph, plan


def cluster(noise: float = 0.0, op_compute_us: float = 0.0, op_overhead_us: float = 0.0, extra_us: float = 0.0,
            quantiles: list[float] | None = None):
    """Two devices of type X on one node, links of 1 GB/s without latency."""
    return cluster_from_dict({"name": "toy", "device_types": [
        {"name": "X", "peak_tflops": 1, "memory_gib": 100, "mem_bandwidth_gbps": 32, "compute_noise": noise,
         "op_compute_us": op_compute_us, "op_overhead_us": op_overhead_us, "collective_extra_us": extra_us,
         **({"compute_quantiles": quantiles} if quantiles else {})}],
        "nodes": [{"name": "n", "gpus": [{"type": "X", "count": 2}],
                   "intra_link": {"bandwidth_gbps": 1.0, "latency_us": 0.0}}]})


DP2 = plan([[(0, 1, [("n/0", 1)])], [(0, 1, [("n/1", 1)])]], 1)
"""Two one-stage replicas (fwd 1 s, bwd 2 s, no parameters: no gradient all-reduce)."""


def test_each_iteration_waits_for_the_late_rank():
    # Iteration k: each device computes 3 s x its factor f(k, d), then both join the loss
    # all-reduce when the later one arrives: the period is 3 max(f(k, .)) + LOSS_2. The
    # early device waits 3 |f(k, 0) - f(k, 1)|, in the first collective that needs both
    # (the gradient all-reduce, here of no bytes), then both take LOSS_2.
    c, cg = cluster(noise=0.1), graph()
    sim = Simulation(DP2, c, cg, SimOptions(iterations=9))
    res = sim.run()
    ends = [0.0]
    for k in range(9):
        f0, f1 = sim.factor[(k, "n/0")], sim.factor[(k, "n/1")]
        assert f0 != f1
        ends.append(ends[-1] + 3 * max(f0, f1) + LOSS_2)
    assert res.iteration_ends_s == pytest.approx(ends[1:])
    rep = simulate(DP2, c, cg, iterations=9)
    periods = [b - a for a, b in zip(ends, ends[1:])]
    assert rep.iteration_time_s == pytest.approx(statistics.median(periods))
    waits = statistics.fmean(3 * abs(sim.factor[(k, "n/0")] - sim.factor[(k, "n/1")]) for k in range(9))
    w0, w1 = rep.devices["n/0"]["work_s"], rep.devices["n/1"]["work_s"]
    assert w0["allreduce"] + w1["allreduce"] == pytest.approx(waits)
    assert w0["loss"] == w1["loss"] == pytest.approx(LOSS_2)
    # the same seed, the same draws; another seed, others
    assert simulate(DP2, c, cg, iterations=9).iteration_ends_s == rep.iteration_ends_s
    assert simulate(DP2, c, cg, iterations=9, seed=1).iteration_ends_s != rep.iteration_ends_s


def draw(key: tuple, mean_s: float = 1e-3, seed: int = 0) -> float:
    """The engine's draw for a wait `key` (seeded by the seed and the key)."""
    return random.Random(f"{seed}:{key}").expovariate(1.0 / mean_s)


def test_each_rank_leaves_its_waits_a_measured_extra_later():
    # No compute noise; a rank goes on 1 ms (mean of an exponential draw, its own, seeded
    # by (seed, which wait, iteration, rank)) after the end of each wait:
    # iteration k, from each device's own start s_d: 3 s of compute, then the gradient
    # all-reduce of no bytes (no parameters), done when the later device arrives (both
    # arrive together in iteration 0: nobody blocks); a device that arrived earlier
    # blocked and goes on g_d later; the loss all-reduce starts when both are there, takes
    # LOSS_2, and each device leaves it l_d later: s_d(k+1) = L + LOSS_2 + l_d.
    c, cg = cluster(extra_us=1000.0), graph()
    rep = simulate(DP2, c, cg, iterations=5)
    start = {"n/0": 0.0, "n/1": 0.0}
    ends, loss_s = [], {"n/0": 0.0, "n/1": 0.0}
    for k in range(5):
        arrive = {d: t + 3 for d, t in start.items()}
        done = max(arrive.values())
        out = {d: done + (draw(("resume", "grad", k, d)) if a < done else 0.0) for d, a in arrive.items()}
        loss_end = max(out.values()) + LOSS_2
        start = {d: loss_end + draw(("resume", "loss", k, d)) for d in start}
        for d in start:
            loss_s[d] += (start[d] - out[d]) / 5
        ends.append(max(start.values()))
    assert rep.iteration_ends_s == pytest.approx(ends)
    assert draw(("resume", "grad", 1, "n/0")) != draw(("resume", "grad", 1, "n/1"))
    for d in start:
        assert rep.devices[d]["work_s"]["loss"] == pytest.approx(loss_s[d])
    # iteration 0 by hand: both leave the loss all-reduce at 3 + LOSS_2 + their own draw
    assert ends[0] == pytest.approx(3 + LOSS_2 + max(draw(("resume", "loss", 0, d)) for d in start))
    # the profile's figure: per step, the rank that came last to the loss all-reduce
    # waited for no one; its time beyond the table's 0.25 ms, averaged
    assert collective_extra([[0.3e-3, 0.5e-3, 2e-3], [0.4e-3, 0.3e-3, 0.2e-3]], 0.25e-3) == pytest.approx(0.1e-3 / 3)


def test_noise_is_off_without_figures_contention_or_repeats():
    cg = graph()
    # no figure: deterministic, 3 s + the loss all-reduce every iteration
    assert simulate(DP2, cluster(), cg, iterations=4).iteration_ends_s == pytest.approx(
        [k * (3 + LOSS_2) for k in range(1, 5)])
    # one iteration (nothing to take a median of), or contention off (the formulas'
    # reference): off unless asked for
    assert simulate(DP2, cluster(noise=0.2), cg).iteration_time_s == pytest.approx(3 + LOSS_2)
    assert simulate(DP2, cluster(noise=0.2), cg, iterations=4, contention=False, overlap=False).iteration_ends_s \
        == pytest.approx([k * (3 + LOSS_2) for k in range(1, 5)])
    assert simulate(DP2, cluster(noise=0.2), cg, iterations=4, noise=False).iteration_time_s == pytest.approx(3 + LOSS_2)


def test_op_compute_is_compute_not_runtime_time():
    # 0.1 s of extra compute per op and 0.05 s of the runtime's own time: F 1.15 s, B 2.15 s;
    # the split books 2 x 0.1 as compute and 2 x 0.05 as 'other'.
    rep = simulate(DP2, cluster(op_compute_us=1e5, op_overhead_us=5e4), graph())
    w = rep.devices["n/0"]["work_s"]
    assert w == pytest.approx({"compute": 3.2, "p2p": 0.0, "allreduce": 0.0, "optimizer": 0.0, "loss": LOSS_2,
                               "other": 0.1}, abs=1e-9)
    assert rep.iteration_time_s == pytest.approx(3.3 + LOSS_2)
    assert rep.predicted["iteration_time_s"] == pytest.approx(3.3 + LOSS_2)


def test_profile_fits_of_compute():
    # Two runs of a rank: 4 ops profiled at 10 ms, measured steps at 12 ms (mean); 16 ops
    # profiled at 40 ms, measured at 44 ms: (2 + 4) ms over 20 ops = 0.3 ms per op.
    assert fit_compute([(4, 0.010, [0.011, 0.012, 0.013]), (16, 0.040, [0.044, 0.043, 0.045])]) == pytest.approx(0.3e-3)
    # the mean step, a stall included: 4 ops profiled at 10 ms, steps of 11, 11 and 20 ms
    # (mean 14 ms): 1 ms per op (the median would say 0.25)
    assert fit_compute([(4, 0.010, [0.011, 0.011, 0.020])]) == pytest.approx(1e-3)
    # compute faster than profiled clamps at 0
    assert fit_compute([(4, 0.010, [0.009] * 3)]) == 0.0
    # own variation: step 2 is 10 % slower on both ranks (the host): nothing of it is a
    # rank's own; step 3 is 10 % slower on rank 0 only: half of log 1.1 is shared,
    # the other half is rank 0's own (+) and rank 1's (-), scaled by 1 / sqrt(1 - 1/2)
    own = own_variation([[1.0, 1.1, 1.1, 1.0, 1.0], [1.0, 1.1, 1.0, 1.0, 1.0]])
    h = math.log(1.1) / 2 * math.sqrt(2)
    assert own[0] == pytest.approx([0.0, 0.0, h, 0.0, 0.0]) and own[1] == pytest.approx([0.0, 0.0, -h, 0.0, 0.0])
    assert own_variation([[1.0, 2.0, 4.0]]) == [[math.log(0.5), 0.0, math.log(2.0)]]  # one rank: as it is
    # log spread: IQR / 1.349 of log(x / median); a rare stall does not move it
    xs = [1.0, 1.0, 1.0, 1.1, 1.1, 1.1, 1.1, 1.2, 1.2, 1.2, 1.2]
    q = statistics.quantiles([math.log(x / 1.1) for x in xs], n=4, method="inclusive")
    assert log_spread(xs) == pytest.approx((q[2] - q[0]) / 1.349)
    assert log_spread(xs + [5.0]) == pytest.approx(log_spread(xs + [1.3]))
    assert log_spread([1.0, 2.0]) == 0.0


def test_a_rank_blocked_on_a_receive_wakes_up_late():
    # Two stages (layer 0 on n/0, layer 1 on n/1), 2 micro-batches (GPipe), fwd 1 s, bwd
    # 2 s, activations 0.5 s on the link; collectives take 1 ms more on average (what the
    # profile measured of a rank woken from idle). n/1 waits for mb0 from t = 0: it arrives
    # at 1.5, and n/1 starts F mb0 a draw d later (mean 1 ms, seeded by which receive);
    # mb1 arrives at 2.5, before n/1 ends F mb0 at 2.5 + d: it did not block, no extra.
    c, cg = cluster(extra_us=1000.0), graph(num_layers=2)
    pp = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2)
    sim = Simulation(pp, c, cg, SimOptions(iterations=2))
    res = sim.run()
    d = random.Random(f"0:{('wake', 0, 'F', 0, 'n/1')}").expovariate(1e3)
    f1 = [(a.t0, a.t1) for a in res.activities if a.device == "n/1" and a.kind == "F" and a.iteration == 0]
    assert f1 == [pytest.approx((1.5 + d, 2.5 + d)), pytest.approx((2.5 + d, 3.5 + d))]
    # without the figure the receive starts F mb0 when the data is there
    res = Simulation(pp, cluster(noise=0.01), cg, SimOptions(iterations=2, seed=3)).run()
    first = min(a.t0 for a in res.activities if a.device == "n/1" and a.kind == "F" and a.iteration == 0)
    assert first == pytest.approx(0.5 + res.activities[0].t1)


def test_compute_is_drawn_from_the_measured_quantiles():
    # Quantiles of log(factor) at levels 0, 1/2, 1: (0, 0, log 2): half the steps at 1x,
    # the other half between 1x and 2x (log-linear). Draws: per iteration, per device in
    # sorted order, one uniform u of Random(seed): factor exp(quantile_value(q, u)) —
    # u < 1/2 gives 1 exactly, u = 3/4 gives sqrt 2. The loss all-reduce waits for the
    # slower device: period 3 max(f) + LOSS_2 (the compute_noise figure is not used).
    q = [0.0, 0.0, math.log(2.0)]
    c, cg = cluster(noise=0.5, quantiles=q), graph()
    sim = Simulation(DP2, c, cg, SimOptions(iterations=6))
    res = sim.run()
    rng = random.Random(0)
    ends, t = [], 0.0
    for k in range(6):
        f = {d: (1.0 if (u := rng.random()) < 0.5 else 2.0 ** (2 * u - 1)) for d in ("n/0", "n/1")}
        assert sim.factor[(k, "n/0")] == pytest.approx(f["n/0"]) and sim.factor[(k, "n/1")] == pytest.approx(f["n/1"])
        t += 3 * max(f.values()) + LOSS_2
        ends.append(t)
    assert res.iteration_ends_s == pytest.approx(ends)
    assert any(v == 1.0 for v in sim.factor.values()) and all(1.0 <= v <= 2.0 for v in sim.factor.values())
    # the profile's quantiles: levels 0, 1/4, ..., 1 of 5 values are the values themselves;
    # of 3 values too few (no tails to speak of)
    assert log_quantiles([0.3, -0.1, 0.0, 0.1, 0.2], levels=4) == (-0.1, 0.0, 0.1, 0.2, 0.3)
    assert log_quantiles([0.0, 0.1, 0.2, 0.3], levels=2) == (0.0, 0.15, 0.3)
    assert log_quantiles([0.0, 0.1, 0.2]) == ()
