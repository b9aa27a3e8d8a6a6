"""Deciding what to do about a straggler or a lost device (workflows.adaptive), and the
simulated episodes that play those decisions out over many steps (simulator.episode,
workflows.episode). Real allocator, real SimPy simulation, no torch."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from hetalloc.cli import main
from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.collectives import MeasuredCollective
from hetalloc.costgraph import Efficiency, cost_graph_from_dict
from hetalloc.plan import Plan, plan_context
from runtime.control import same_layout
from runtime.monitor import MonitorConfig
from runtime.plans import cpu_cost_graph, describe, hand_plan
from simulator import simulate
from simulator.episode import IterationCache, SpeedTrace, parse_failure, parse_straggler, play
from simulator.scenarios import Case, fail
from simulator.speeds import in_context, speed_case
from workflows.adaptive import AdaptOptions, Beliefs, decide_lost, decide_replan, decide_shares, take_reports
from workflows.episode import EpisodeOptions, replay_episode, run_episode
from workflows.rebalance import rebalance_shares

ROOT = Path(__file__).resolve().parents[1]


def linear_cpu(model: str = "gpt2-tiny", seq: int = 64):
    """Three CPU devices whose analytic times grow in proportion to the share (no
    efficiency curve: a CPU computes a sample in the same time at any batch size)."""
    cluster = fail("host/3")(Case(load_cluster(ROOT / "examples" / "cpu-4.yaml"), None, 1, None)).cluster
    cg = cpu_cost_graph(model, seq)
    cg = cg.with_efficiency({"CPU": {k: Efficiency(compute=0.05, tokens_half=0.0) for k in {l.kind for l in cg.layers}}})
    return cluster, cg


def dp3(cluster, cg, shares=(4, 4, 4), m: int = 2) -> Plan:
    return hand_plan(cluster, cg, [[((0, 6), [(f"host/{i}", s) for i, s in enumerate(shares)])]], num_microbatches=m)


def test_speed_case_scales_every_time_exactly_and_round_trips_through_a_plan():
    cluster, cg = linear_cpu()
    mc, mg = speed_case(cluster, cg, {"host/1": 3.0, "host/2": 1.01}, lost={"host/0"})
    assert [d.id for d in mc.devices] == ["host/1", "host/2"]
    assert mc.device("host/1").type == "CPU@x3" and mc.device("host/2").type == "CPU"  # within 2 %: noise
    for share in (1, 4, 9):
        base = cg.range_time(0, 6, cluster.dtype("host/0"), share)
        slow = mg.range_time(0, 6, mc.dtype("host/1"), share)
        assert slow == pytest.approx(tuple(3 * x for x in base), rel=1e-12)
    p = in_context(hand_plan(cluster, cg, [[((0, 6), [("host/1", 4), ("host/2", 4)])]], num_microbatches=2), mc, mg)
    d = p.to_dict()
    assert cluster_from_dict(d["cluster"]["spec"]).fingerprint() == mc.fingerprint()
    assert cost_graph_from_dict(d["cost_graph"]["spec"]).fingerprint() == mg.fingerprint()


def test_speed_case_keeps_the_measured_parts_of_the_cluster():
    # a profiled host: 3 ranks on 2 cores, a measured all-reduce table; an episode's speed
    # case (a straggler, a lost device) must keep both, or its simulation runs the ranks
    # on cores of their own with the formulas' collectives (sim 1.6x faster than the run)
    cluster, cg = linear_cpu()
    table = MeasuredCollective("allreduce", "intra", 3, (8.0, 1e6), (1e-4, 1e-3), 50.0, 1.0, link="cpu-4-intra")
    nodes = [replace(n, compute_slots=2) for n in cluster.nodes]
    measured = replace(cluster, nodes=nodes, collectives=(table,), _path_cache={})
    mc, _ = speed_case(measured, cg, {"host/1": 3.0})
    assert [n.compute_slots for n in mc.nodes] == [2] * len(nodes) and mc.collectives == (table,)
    mc, _ = speed_case(measured, cg, {}, lost={"host/2"})
    assert mc.collectives == (table,) and all(n.compute_slots == 2 for n in mc.nodes)


def test_rebalanced_shares_minimise_the_slowest_group_as_brute_force_does():
    cluster, cg = linear_cpu()
    mc, mg = speed_case(cluster, cg, {"host/1": 3.0, "host/2": 1.7})
    p = dp3(cluster, cg)
    new = rebalance_shares(p, mc, mg)
    assert not same_layout(p, new) and new.global_batch == p.global_batch

    def slowest(shares):
        return max(sum(mg.range_time(0, 6, mc.dtype(f"host/{i}"), s)) for i, s in enumerate(shares))

    best = min(slowest(x) for x in itertools.product(range(1, 11), repeat=3) if sum(x) == 12)
    got = [g.share for g in new.replicas[0].stages[0].groups]
    assert slowest(got) == pytest.approx(best, rel=1e-12)
    assert got[0] > got[2] > got[1]  # the fastest gets most


def test_decide_shares_acts_when_the_simulator_predicts_a_gain():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    beliefs = Beliefs(cluster, cg)
    assert decide_shares(p, beliefs, AdaptOptions(), "t").record["why"] == \
        "the shares are already balanced for the measured speeds"
    take_reports(beliefs, [{"device": "host/1", "level": 3.0}, {"device": "host/2", "level": 0.6}], {})
    assert beliefs.factors == {"host/1": 3.0, "host/2": 1.0}  # never faster than calibrated
    assert decide_shares(p, beliefs, AdaptOptions(policy="none"), "t").kind == "note"
    d = decide_shares(p, beliefs, AdaptOptions(), "rank 1 slower")
    assert d.kind == "shares" and d.record["action"] == "shares"
    pred = d.record["predicted_s"]
    assert pred["shares"] < 0.95 * pred["current"]
    mc, mg = beliefs.case()
    assert pred["current"] == simulate(in_context(p, mc, mg), mc, mg).iteration_time_s
    # The plan sent carries the measured case: its predictions hold the 3x.
    assert d.plan.cluster_spec == mc.to_dict()


def test_decide_replan_restarts_only_when_the_gain_over_the_horizon_exceeds_the_switch_cost():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    beliefs = Beliefs(cluster, cg, {"host/1": 8.0})
    opts = AdaptOptions()
    keep = decide_shares(p, beliefs, opts, "t").plan
    cheap = decide_replan(keep, beliefs, opts, "t", steps_left=500, step_time_s=1.0, switch_cost_s=0.5)
    new_s, keep_s = cheap.record["predicted_s"]["replan"], cheap.record["predicted_s"]["current"]
    assert new_s < keep_s
    assert cheap.record["gain_s"] == pytest.approx((keep_s - new_s) / keep_s * 1.0 * 200)  # the horizon, not 500
    assert cheap.kind == "restart" and "host/1" not in cheap.plan.device_ids()
    dear = decide_replan(keep, beliefs, opts, "t", steps_left=500, step_time_s=1.0,
                         switch_cost_s=cheap.record["gain_s"] * 1.01)
    assert dear.kind == "note" and "would gain less than the switch costs" in dear.record["why"]
    short = decide_replan(keep, beliefs, opts, "t", steps_left=10, step_time_s=1.0, switch_cost_s=20)
    assert short.kind == "note" and "predicted_s" not in short.record  # no re-plan tried: it could not pay
    assert decide_replan(keep, beliefs, AdaptOptions(policy="shares"), "t", steps_left=500, step_time_s=1.0,
                         switch_cost_s=0).kind == "note"


def test_decide_lost_plans_for_the_devices_left():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    d = decide_lost(p, Beliefs(cluster, cg, lost={"host/1"}), AdaptOptions(), "rank 1 lost")
    assert d.kind == "restart" and set(d.plan.device_ids()) <= {"host/0", "host/2"}
    assert d.plan.global_batch == p.global_batch
    assert decide_lost(p, Beliefs(cluster, cg, lost={"host/1"}), AdaptOptions(policy="none"), "t").kind == "note"


def test_a_fixed_plan_plays_at_the_speeds_in_effect_and_stops_at_a_failure():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    cache = IterationCache(cluster, cg)
    normal = cache.run(p, {}).time_s
    slow = cache.run(p, {"host/1": 3.0}).time_s
    trace = SpeedTrace([parse_straggler("host/1=3@5"), parse_straggler("host/1=1@8"), parse_failure("host/2@12")])
    played = play(p, trace, cache, steps=20)
    assert [round(b - a, 12) for _, a, b in played.steps] == [round(x, 12) for x in [normal] * 4 + [slow] * 3
                                                              + [normal] * 4]
    assert played.failed == ("host/2", pytest.approx(8 * normal + 3 * slow))
    assert cache.simulations == 2
    timed = SpeedTrace([parse_straggler(f"host/1=3@{2.5 * normal}s")])  # the iteration starting after 2.5 steps
    assert [round(b - a, 12) for _, a, b in play(p, timed, cache, steps=5).steps] == \
        [round(x, 12) for x in [normal] * 3 + [slow] * 2]


def test_episodes_react_as_a_live_run_does():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    trace = SpeedTrace([parse_straggler("host/1=3@20"), parse_straggler("host/1=1@50")])
    opts = EpisodeOptions(steps=80, switch_cost_s=5.0)
    none = run_episode(p, cluster, cg, trace, "none", opts)
    shares = run_episode(p, cluster, cg, trace, "shares", opts)
    cache = IterationCache(cluster, cg)
    normal, slow = cache.run(p, {}).time_s, cache.run(p, {"host/1": 3.0}).time_s
    assert none["step_times_s"] == pytest.approx([normal] * 19 + [slow] * 30 + [normal] * 31)
    # The monitor reports at step 23 (tests/test_monitor.py), the new shares run from 25;
    # back at speed from 50, reported at 53, even shares again from 55.
    assert [(d["step"], d["action"]) for d in shares["decisions"]] == [(23, "shares"), (53, "shares")]
    t = shares["step_times_s"]
    assert t[:24] == pytest.approx([normal] * 19 + [slow] * 5)
    assert t[24] < 0.8 * slow and t[24:49] == pytest.approx([t[24]] * 25)
    assert t[54:] == pytest.approx([normal] * 26)
    assert shares["samples_per_s"] > 1.1 * none["samples_per_s"]
    lost = SpeedTrace([parse_failure("host/1@30")])
    opts = EpisodeOptions(steps=80, switch_cost_s=5.0, checkpoint_every=10)
    ended = run_episode(p, cluster, cg, lost, "none", opts)
    assert ended["steps_done"] == 29 and ended["ended"].startswith("host/1 lost")
    went_on = run_episode(p, cluster, cg, lost, "replan", opts)
    assert went_on["steps_done"] == 80 and went_on["restarts"] == 1 and went_on["steps_redone"] == 9
    assert "host/1" not in went_on["final_layout"]


def test_a_decision_that_reaches_the_ranks_late_takes_effect_a_step_later():
    # Reported at step 23 (end t); steps 24 and 25 start at t and t + slow. A decision
    # ready 1.5 slow steps after t misses step 25's start: the shares run from step 26.
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    trace = SpeedTrace([parse_straggler("host/1=3@20")])
    slow = IterationCache(cluster, cg).run(p, {"host/1": 3.0}).time_s
    on_time = run_episode(p, cluster, cg, trace, "shares", EpisodeOptions(steps=40, decision_s=0.9 * slow))
    late = run_episode(p, cluster, cg, trace, "shares", EpisodeOptions(steps=40, decision_s=1.5 * slow))
    assert on_time["step_times_s"][:24] == pytest.approx([on_time["step_times_s"][0]] * 19 + [slow] * 5)
    assert on_time["step_times_s"][24] < 0.8 * slow
    assert late["step_times_s"][24] == pytest.approx(slow) and late["step_times_s"][25] < 0.8 * slow
    assert late["step_times_s"][26:] == pytest.approx(on_time["step_times_s"][26:])


def test_a_replay_plays_the_shares_a_run_switched_to_from_the_step_they_took_effect():
    cluster, cg = linear_cpu()
    p = in_context(dp3(cluster, cg), cluster, cg)
    trace = SpeedTrace([parse_straggler("host/1=3@20"), parse_straggler("host/1=1@50")])
    shares = run_episode(p, cluster, cg, trace, "shares", EpisodeOptions(steps=80, switch_cost_s=5.0))
    cache = IterationCache(cluster, cg)
    assert replay_episode(p, cluster, cg, trace, [], 80, cache)["step_times_s"] == pytest.approx(
        run_episode(p, cluster, cg, trace, "none", EpisodeOptions(steps=80))["step_times_s"])
    moved = dp3(cluster, cg, (5, 2, 5))
    r = replay_episode(p, cluster, cg, trace, [(25, moved), (55, p)], 80, cache)
    assert r["step_times_s"][:24] == pytest.approx(shares["step_times_s"][:24])
    assert r["step_times_s"][24:49] == pytest.approx([cache.run(in_context(moved, cluster, cg), {"host/1": 3.0}).time_s] * 25)
    assert r["step_times_s"][54:] == pytest.approx(shares["step_times_s"][54:])
    assert r["final_layout"] == describe(p)


def test_whatif_straggler_prints_one_row_per_policy(tmp_path, capsys):
    cluster, cg = linear_cpu()
    dp3(cluster, cg).save(tmp_path / "plan.json")
    assert main(["whatif", str(tmp_path / "plan.json"), "--straggler", "host/1=3@20", "--straggler", "host/1=1@50",
                 "--steps", "80", "--switch-cost", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["rows"]] == ["none", "shares", "replan"]
    assert out["rows"][1]["speedup_vs_none"] > 1.1
    assert main(["whatif", str(tmp_path / "plan.json"), "--straggler", "host/9=3@20"]) == 2
    assert "no device 'host/9'" in capsys.readouterr().err
    assert main(["whatif", str(tmp_path / "plan.json"), "--straggler", "host/1=3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --straggler: host/1=3: expected DEVICE=FACTOR@T with FACTOR > 0 — "
                                               "e.g. --straggler a100/3=3@200 (3x slower from step 200), a100/3=1@500 "
                                               "(back to speed)")


def test_run_adaptive_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    cluster, cg = linear_cpu()
    dp3(cluster, cg).save(tmp_path / "plan.json")
    assert main(["run", str(tmp_path / "plan.json"), "--adaptive", "--max-restarts", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-restarts: does not go with --adaptive (a lost rank is "
                                               "re-planned around) — drop --max-restarts")
    assert main(["run", str(tmp_path / "plan.json"), "--adaptive", "--horizon", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: hetalloc run --adaptive: horizon_steps must be at least 1.")
    assert main(["run", str(tmp_path / "plan.json"), "--adaptive", "--slowdown", "1=3@0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --slowdown: 1=3@0: expected RANK=FACTOR@STEP with a whole "
                                               "STEP >= 1 — e.g. --slowdown 1=3@20 (rank 1 three times as slow from "
                                               "step 20 on)")
    assert main(["run", str(tmp_path / "plan.json"), "--adaptive", "--slowdown", "7=3@20"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --slowdown: 7: is not a rank of this run (0..2)")


def test_a_rank_that_stops_answering_is_told_from_one_that_runs():
    import signal
    import subprocess
    import time

    from workflows.adaptive import not_answering
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        pids = [p.pid for p in procs]
        assert not_answering(pids) == []
        procs[1].send_signal(signal.SIGSTOP)
        procs[2].kill()  # killed, not yet waited for: a zombie
        deadline = time.time() + 5
        while not_answering(pids) != [1, 2] and time.time() < deadline:
            time.sleep(0.05)
        assert not_answering(pids) == [1, 2]
        procs[2].wait()
        assert not_answering(pids) == [1, 2]  # gone
        procs[1].send_signal(signal.SIGCONT)
        deadline = time.time() + 5
        while not_answering(pids) != [2] and time.time() < deadline:
            time.sleep(0.05)
        assert not_answering(pids) == [2]
    finally:
        for p in procs:
            p.kill()
            p.wait()
