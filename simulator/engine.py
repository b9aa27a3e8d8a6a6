"""The discrete-event model of training iterations of a Plan on a Cluster (SimPy).

Each simulated group (one device, or t tensor-parallel devices in lockstep) is a
generator process on its compute stream: it runs its schedule's forward/backward ops
(``hetalloc.schedule.stage_op_order``), each waiting for its inputs (a first or last
stage's group first builds its step's inputs or labels, ``hetalloc.costs.input_time``;
a backward that does not follow its own forward takes the cold-cache time,
``hetalloc.schedule.warm_backward``); an op is its
compute (the backward including the recomputed forward), then its tensor-parallel
all-reduces as a collective over the group's ring (lane ``tp``); it waits for its last
sends to leave; then it waits for its gradient collectives, runs its optimizer step, and
joins the end-of-step loss all-reduce of every device (the next iteration starts when it
ends), as the runtime does. Every device (rank) also has two
communication lanes: ``p2p`` (activation / gradient sends, in order) and ``collective``
(gradient all-reduces, in reverse layer order as DDP issues them; with zero1
reduce-scatters before the optimizer step and all-gathers after it). The links
underneath are shared (``simulator.links``): tensor-parallel rings contend with pipeline
sends and gradient synchronisation. Compute ops run on ``simulator.compute`` (shared
compute slots, interference with communication).

Two switches, both on by default:
- ``contention``: transfers share link bandwidth (fair sharing, collectives step by step
  over the real links). Off: every transfer takes its formula time
  (``hetalloc.costs.p2p_time``, ``hetalloc.evaluate.allreduce_time``, its zero1 halves,
  ``hetalloc.evaluate.group_tp_times``) however many run.
- ``overlap``: sends go to the p2p lane while compute continues, and gradients are
  all-reduced in DDP buckets as soon as every holder has finished their backward.
  Off: sends block the op that produced them (a receiver waits for the whole op, as the
  cost prediction assumes) and each gradient group is all-reduced in one piece after
  the pipeline phase of all replicas has ended.
- ``shared_compute`` and ``interference`` (default: as ``contention``): devices on a node
  with fewer compute slots than devices share them; compute and communication slow each
  other by the device types' measured interference figures (``simulator.compute``).
- ``noise`` (default: as ``contention``, when more than one iteration is simulated):
  each group's compute of each iteration is drawn from its device type's measured
  step-to-step spread (``DeviceType.compute_quantiles``, else ``compute_noise``), seeded; the report then gives the
  median iteration (a run is judged by its median step), and every collective that needs
  all ranks (the loss and gradient all-reduces) or a pipeline receive waits for the late
  rank of that iteration, as in a run. Each rank leaves a wait on its own: a rank that
  blocked on a receive or on its gradient all-reduces, and every rank at the end of the
  loss all-reduce, goes on a draw of its type's ``collective_extra_us`` later (a thread
  woken from its wait: what the profile measured on the loss all-reduce's last rank,
  beyond the table); so the next sync waits for the rank that left the last one last.
  Without measured figures nothing changes.
Collectives are timed by the cluster's measured tables where it has them
(``hetalloc.evaluate.allreduce_time``); over the links, a measured collective alone
takes exactly its measured time (its steps get the difference as latency, or move
proportionally fewer bytes when the measurement is faster than the links).
With contention and overlap off the simulation is ``hetalloc.evaluate.predict`` played
out in time.

Never: compute a cost here — durations come from simulator.pipeline (which takes them
from hetalloc) and from the network; this module only orders them in time.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import simpy

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.errors import SpecError
from hetalloc.costs import quantile_value, zero1_halves
from hetalloc.evaluate import allreduce_time, loss_reduction_time, measured_sync_time, sync_groups
from hetalloc.plan import Plan, validate_plan

from .collectives import STEP_BUILDERS, Bucket, Step, alone_time, buckets, tp_steps
from .compute import ComputeModel
from .links import LinkLog, Network, Topology, UsageTable
from .pipeline import DeviceWork, ReplicaClass, Send, fold_replicas, optimizer_work, replica_work, split_chains

DDP_BUCKET_BYTES = 25 * 2**20
"""PyTorch DDP's default bucket_cap_mb (25 MiB)."""
NOISE_ITERATIONS = 30
"""Iterations a prediction simulates where the cluster has measured compute noise
(SimOptions.noise): its median iteration is what a run's median step is compared with."""


def prediction_iterations(cluster: Cluster) -> int:
    """Iterations to simulate for a prediction on `cluster`: NOISE_ITERATIONS where some
    device type has measured noise (compute, collectives), else 1 (every iteration is
    the same)."""
    return NOISE_ITERATIONS if any(t.compute_noise > 0 or t.compute_quantiles or t.collective_extra_us > 0
                                   for t in cluster.device_types.values()) else 1


@dataclass(kw_only=True, slots=True)
class SimOptions:
    contention: bool = True
    """Share link bandwidth among concurrent transfers; collectives step by step."""
    overlap: bool = True
    """Asynchronous sends and bucketed gradient all-reduce overlapped with backward."""
    iterations: int = 1
    """Training iterations to simulate back to back."""
    bucket_bytes: float = DDP_BUCKET_BYTES
    """Gradient bucket size with overlap."""
    max_collective_steps: int = 32
    """At most this many (merged) steps per collective; 2(n-1) ring steps above it are merged."""
    fold: bool = True
    """Split wide replicas into their independent chains and simulate one representative
    of identical pipelines, where that is exact (simulator.pipeline)."""
    record: bool = True
    """Keep the step-by-step log of every collective (shown in traces)."""
    shared_compute: bool | None = None
    """Devices on a node with fewer compute slots than devices share them (processor
    sharing); None: as ``contention``."""
    interference: bool | None = None
    """Compute and communication slow each other by the device types' measured
    interference figures (simulator.compute); None: as ``contention``."""
    noise: bool | None = None
    """Draw each simulated group's compute of each iteration from its device type's
    measured step-to-step spread (a factor on all its forward and backward ops of that
    iteration: from the measured distribution, ``DeviceType.compute_quantiles``, where
    the profile gave it, else log-normal of median 1 and ``compute_noise``), so that what waits
    for every rank (the loss and gradient all-reduces, a pipeline's receives) waits for
    the late ones as in a run; the report's iteration time is then the median over the
    iterations. None: as ``contention``, where more than one iteration is simulated.
    Each rank also leaves each wait (a receive or its gradient all-reduces it blocked on,
    the loss all-reduce) an extra later, drawn for that rank from an exponential
    distribution of its type's ``collective_extra_us`` (what a collective takes in a run
    beyond its measured table, on the rank that came last). Replicas are not folded while
    it is on (each draws its own)."""
    seed: int = 0
    """Seed of the noise draws (the same seed, the same simulation)."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1.")
        if self.bucket_bytes <= 0:
            raise ValueError("bucket_bytes must be greater than 0.")
        if self.max_collective_steps < 2:
            raise ValueError("max_collective_steps must be at least 2.")


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules."""

    def __init__(self) -> None:
        super().__init__()
        self.num_events = 0

    def schedule(self, event, priority=1, delay=0):  # noqa: D401 - SimPy signature
        self.num_events += 1
        super().schedule(event, priority, delay)


@dataclass(slots=True)
class Activity:
    device: str
    lane: str
    """compute | tp | p2p | collective"""
    kind: str
    """F | B | data | optimizer | tp | send | allreduce | reducescatter | allgather | loss"""
    name: str
    t0: float
    t1: float
    cause: int
    """Index of the activity whose end released this one (-1: none)."""
    iteration: int
    usage: int = -1
    """For sends: the usage key of their link load (to find the bottleneck link)."""
    group: int = -1
    """For all-reduces: the gradient group."""
    rank: int = 0
    """Which rank of the device's group did it (sends and collectives of a TP group)."""


@dataclass
class Collective:
    key: tuple
    group: int
    bucket: Bucket
    members: list[str]
    """Representative devices taking part (each stands for its mates)."""
    devices: list[str]
    """All devices of the group."""
    done: simpy.Event
    part: str = "all"
    """'all' (all-reduce), or under zero1 'rs' (reduce-scatter) / 'ag' (all-gather)."""
    prev: list[simpy.Event] = field(default_factory=list)
    steps: list[tuple[str, float, float]] = field(default_factory=list)
    """(phase, start, end) of each (merged) step, when simulated over the links."""


@dataclass
class SimResult:
    """Raw outcome of a run; ``simulator.report`` turns it into figures."""

    plan: Plan
    cluster: Cluster
    cg: CostGraph
    options: SimOptions
    topo: Topology
    table: UsageTable
    log: LinkLog
    work: dict[str, DeviceWork]
    rep_of: dict[str, str]
    chains: Plan
    """The plan cut into independent pipelines (what ``classes`` index)."""
    classes: list[ReplicaClass]
    activities: list[Activity]
    memory_events: dict[str, list[tuple[float, float]]]
    iteration_ends_s: list[float]
    groups: list
    collective_steps: list[list[Step]]
    collectives: list[Collective]
    num_events: int
    wall_s: float
    network_solves: int
    marks: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Per simulated group and iteration: start, pipe_end (last op done and its sends
    gone), opt_start, opt_end, end (the loss all-reduce done)."""
    loss_time_s: float = 0.0
    noisy: bool = False
    """Whether compute was drawn from the measured noise (SimOptions.noise)."""


class Simulation:
    """One run: build the devices' work, the links and the collectives, then ``run()``."""

    def __init__(self, plan: Plan, cluster: Cluster, cg: CostGraph, options: SimOptions | None = None):
        self.opts = options or SimOptions()
        validate_plan(plan, cluster, cg, check_memory=False)
        self.plan, self.cluster, self.cg = plan, cluster, cg
        self.env = CountingEnvironment()
        self.topo = Topology(cluster)
        self.table = UsageTable()
        self.log = LinkLog()
        self.net = Network(self.env, self.topo, self.log) if self.opts.contention else None
        shared = self.opts.contention if self.opts.shared_compute is None else self.opts.shared_compute
        interference = self.opts.contention if self.opts.interference is None else self.opts.interference
        self.compute = ComputeModel(self.env, cluster, shared=shared, interference=interference)
        # Shared compute couples the devices of a node, whichever replica they serve.
        noise = (self.opts.contention and self.opts.iterations > 1) if self.opts.noise is None else self.opts.noise
        self.noisy = noise and any(cluster.device_types[d.type].compute_noise > 0
                                   or cluster.device_types[d.type].compute_quantiles
                                   or cluster.device_types[d.type].collective_extra_us > 0 for d in cluster.devices)
        fold = (self.opts.fold and not self.noisy
                and not any(self.compute.nodes[n.name].share_slots for n in cluster.nodes))
        self.groups = [g for g in sync_groups(plan, cluster, cg) if len(g.devices) > 1]
        build = STEP_BUILDERS[plan.grad_sync]
        self.parts = ("rs", "ag") if plan.optimizer_sharding == "zero1" else ("all",)
        self.part_steps: dict[tuple[int, str], list[Step]] = {
            (gi, part): build(self.topo, self.table, g.devices, self.opts.max_collective_steps, part)
            for gi, g in enumerate(self.groups) for part in self.parts}
        self.steps: list[list[Step]] = [[st for part in self.parts for st in self.part_steps[(gi, part)]]
                                        for gi in range(len(self.groups))]
        coll_usages = [u for steps in self.steps for st in steps for u, _ in st.flows]
        self.chains = split_chains(plan) if self.opts.fold else plan
        placement = plan.placement()
        self.classes = fold_replicas(self.chains, cluster, self.topo, self.table, contention=self.opts.contention,
                                     collective_usages=coll_usages, enabled=fold)
        self.work: dict[str, DeviceWork] = {}
        self.rep_of: dict[str, str] = {}
        """device -> the simulated group (its rank 0's id) that stands for it."""
        self.rank_rep: dict[str, str] = {}
        """device -> the simulated device (same rank of the representative group) for it."""
        self.rank_index: dict[str, int] = {}
        optimizer = optimizer_work(plan, cluster, cg)
        for c in self.classes:
            works, sends = replica_work(self.chains, c.replicas[0], cluster, cg, self.topo, optimizer)
            for s, u in zip(sends, c.usages):
                s.usage = u
            for w, u in zip([w for w in works if len(w.ranks) > 1], c.tp_usages):
                w.tp_usage = u
            for w in works:
                w.replica = placement[w.id][0]  # the plan's replica, not the chain's index
                self.work[w.id] = w
                for k, d in enumerate(w.ranks):
                    self.rank_index[d] = k
            for ri in c.replicas:
                groups = [g for s in self.chains.replicas[ri].stages for g in s.groups]
                for w, g in zip(works, groups):
                    for d, rd in zip(g.devices, w.ranks):
                        self.rep_of[d] = w.id
                        self.rank_rep[d] = rd
                    if g.lead != w.id:
                        w.mates.extend(g.devices)
        self.acts: list[Activity] = []
        self.mem: dict[str, list[tuple[float, float]]] = {d: [] for d in self.work}
        self._events: dict[tuple, simpy.Event] = {}
        self.iteration_ends = [0.0] * self.opts.iterations
        self._formula_cache: dict[tuple, float] = {}
        self.collectives: list[Collective] = []
        self.lane_colls: dict[tuple[int, str], list[Collective]] = {}
        self._finished: set[str] = set()
        self.lanes: dict[str, simpy.Store] = {}
        self.marks: dict[str, list[dict[str, float]]] = {d: [{} for _ in range(self.opts.iterations)]
                                                         for d in self.work}
        self.loss_time = loss_reduction_time(cluster, list(placement))
        self._last_send: dict[tuple[int, str], simpy.Event] = {}
        self._measured: dict[tuple, tuple[float, float, float] | None] = {}
        self.factor: dict[tuple[int, str], float] = {}
        """(iteration, simulated group) -> its compute factor (noise; 1 where absent)."""
        if self.noisy:
            rng = random.Random(self.opts.seed)
            for it in range(self.opts.iterations):
                for d in sorted(self.work):
                    dt = self.work[d].dtype
                    if dt.compute_quantiles:  # the measured distribution, tails included
                        self.factor[(it, d)] = math.exp(quantile_value(dt.compute_quantiles, rng.random()))
                    else:
                        sigma = dt.compute_noise
                        self.factor[(it, d)] = math.exp(sigma * rng.gauss(0.0, 1.0)) if sigma > 0 else 1.0

    # ---- bookkeeping ------------------------------------------------------------------
    # Events carry (activity index, time): the activity whose end released the waiter.
    def _event(self, key: tuple) -> simpy.Event:
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = self.env.event()
        return ev

    def _begin(self, device: str, lane: str, kind: str, name: str, cause: int, it: int, *,
               usage: int = -1, group: int = -1, rank: int = 0) -> int:
        now = self.env.now
        self.acts.append(Activity(device, lane, kind, name, now, now, cause, it, usage, group, rank))
        return len(self.acts) - 1

    def _end(self, i: int) -> tuple[int, float]:
        self.acts[i].t1 = self.env.now
        return i, self.env.now

    @staticmethod
    def _latest(*marks) -> int:
        """Of (activity, time) marks, the activity released last (-1 if none)."""
        best, t = -1, -1.0
        for m in marks:
            if m is not None and m[0] >= 0 and m[1] > t:
                best, t = m
        return best

    def _wait(self, events: list[simpy.Event]):
        """Yieldable for 'all of these'."""
        if len(events) == 1:
            return events[0]
        return self.env.all_of(events)

    # ---- transfers --------------------------------------------------------------------
    def _transfer(self, s: Send):
        if s.nbytes <= 0:
            return
        t0 = self.env.now
        ends = (self.rep_of[s.src], self.rep_of[s.dst])  # the simulated groups whose compute it meets
        self.compute.comm_begin(ends, "p2p")
        busy = self.compute.busy_marks(ends)
        if self.net is None:
            yield self.env.timeout(s.formula_s)
            self.log.record(s.usage, t0, self.env.now, s.nbytes)
        else:
            yield self.env.timeout(s.latency_s)
            yield self.net.transfer(s.usage, s.nbytes)
        if busy:
            extra = self.compute.comm_extra(ends, "p2p", busy)
            if extra > 0:
                yield self.env.timeout(extra)
        self.compute.comm_end(ends, "p2p")

    def _measured_fit(self, c: Collective) -> tuple[float, float, float] | None:
        """For a collective the cluster has measured: (extra seconds before its steps, scale
        of their bytes, scale of their latencies) that make it, alone on the links, take
        its measured time; None when it is priced by the formulas (their steps already
        add up to them)."""
        key = (c.group, c.bucket.nbytes, c.part)
        if key not in self._measured:
            target = measured_sync_time(self.cluster, c.devices, c.bucket.nbytes, self.plan.grad_sync)
            fit = None
            if target is not None:
                if c.part != "all":
                    rs, ag = zero1_halves(target)
                    target = rs if c.part == "rs" else ag
                steps = self.part_steps[(c.group, c.part)]
                lat = sum(st.latency_s for st in steps)
                total = alone_time(steps, c.bucket.nbytes, self.topo)
                if target >= total:
                    fit = (target - total, 1.0, 1.0)
                elif target >= lat:
                    fit = (0.0, (target - lat) / (total - lat), 1.0)
                else:
                    fit = (0.0, 0.0, target / lat)
            self._measured[key] = fit
        return self._measured[key]

    def _collective_time(self, c: Collective) -> float:
        key = (c.group, c.bucket.nbytes, c.part)
        t = self._formula_cache.get(key)
        if t is None:
            t = allreduce_time(self.cluster, c.devices, c.bucket.nbytes, self.plan.grad_sync)
            if c.part != "all":
                rs, ag = zero1_halves(t)
                t = rs if c.part == "rs" else ag
            self._formula_cache[key] = t
        return t

    def _tp(self, w: DeviceWork, kind: str):
        """The op's tensor-parallel all-reduces: formula time, or ring steps over the links."""
        n, nbytes = (w.tp_allreduces[0], w.tp_allreduces[1]) if kind == "F" else w.tp_allreduces[2:]
        t = len(w.ranks)
        t0 = self.env.now
        if self.net is None:
            yield self.env.timeout(w.tp_fwd_s if kind == "F" else w.tp_bwd_s)
            self.log.record(w.tp_usage, t0, self.env.now, 2.0 * (t - 1) / t * nbytes)
            return
        key = ("tp", w.id, kind)
        steps = self._formula_cache.get(key)
        if steps is None:
            steps = self._formula_cache[key] = tp_steps(self.topo, w.tp_usage, t, n, self.opts.max_collective_steps)
        for st in steps:
            yield self.env.timeout(st.latency_s)
            yield self._wait([self.net.transfer(u, f * nbytes) for u, f in st.flows])

    def _sends(self, w: DeviceWork, rank: int, sends: list[Send], it: int, kind: str, m: int, prev):
        """One rank's blocking sends of an op, one after another; returns its last mark."""
        for s in sends:
            i = self._begin(w.id, "p2p", "send", f"{kind} mb{m} {s.src} -> {s.dst}" if len(w.ranks) > 1
                            else f"{kind} mb{m} -> {s.dst}", prev[0], it, usage=s.usage.key, rank=rank)
            yield from self._transfer(s)
            prev = self._end(i)
        return prev

    # ---- processes --------------------------------------------------------------------
    def _device(self, w: DeviceWork):
        env, overlap = self.env, self.opts.overlap
        prev = (-1, 0.0)
        last_b = max(i for i, (k, _) in enumerate(w.order) if k == "B")
        has_tp = len(w.ranks) > 1 and (w.tp_allreduces[0] or w.tp_allreduces[2])
        for it in range(self.opts.iterations):
            if w.data_s > 0:  # its inputs or labels, built before its first op
                i = self._begin(w.id, "compute", "data", "inputs", prev[0], it)
                yield env.timeout(w.data_s)
                prev = self._end(i)
            for pos, (kind, m) in enumerate(w.order):
                pairs = w.recv_fwd if kind == "F" else w.recv_bwd
                deps = [self._event(("arrive", it, kind, m, src, dst)) for src, dst in pairs]
                if deps:
                    t_wait = env.now
                    yield self._wait(deps)
                    if env.now > t_wait:  # it blocked on the receive: it wakes up later than the data comes
                        wake = self._collective_extra(("wake", it, kind, m, w.id), w.ranks)
                        if wake > 0:
                            yield env.timeout(wake)
                op = self._begin(w.id, "compute", kind, f"{kind} mb{m} L{w.start}-{w.stop - 1}",
                                 self._latest(prev, *(d.value for d in deps)), it)
                marks = None
                f = self.factor.get((it, w.id), 1.0)
                if kind == "F":
                    self.mem[w.id].append((env.now, w.act_bytes_per_mb))
                    work, layers = w.fwd_s, []
                else:
                    work, layers = w.backward(pos)
                    if pos == last_b and overlap:
                        marks = self._ready_marks(w, it, op, f, layers)
                yield self.compute.run(w.id, f * work, marks)
                prev = self._end(op)
                if kind == "B":
                    self.mem[w.id].append((env.now, -w.act_bytes_per_mb))
                if has_tp:
                    n, nbytes = (w.tp_allreduces[0], w.tp_allreduces[1]) if kind == "F" else w.tp_allreduces[2:]
                    i = self._begin(w.id, "tp", "tp", f"tp all-reduce {kind} mb{m} ({n} x {len(w.ranks)} devices, "
                                    f"{nbytes / 2**20:.1f} MiB)", prev[0], it, usage=w.tp_usage.key)
                    self.compute.comm_begin([w.id], "collective")
                    yield from self._tp(w, kind)
                    self.compute.comm_end([w.id], "collective")
                    prev = self._end(i)
                sends = w.sends_fwd if kind == "F" else w.sends_bwd
                if overlap:
                    for s in sends:
                        self.lanes[s.src].put((it, kind, m, s, prev))
                        self._last_send[(it, s.src)] = self._event(("arrive", it, kind, m, s.src, s.dst))
                    continue
                by_rank: dict[str, list[Send]] = {}
                for s in sends:
                    by_rank.setdefault(s.src, []).append(s)
                if len(by_rank) == 1:
                    (src, ss), = by_rank.items()
                    prev = yield from self._sends(w, self.rank_index[src], ss, it, kind, m, prev)
                elif by_rank:  # the ranks send in parallel; the op ends with the last of them
                    procs = [env.process(self._sends(w, self.rank_index[src], ss, it, kind, m, prev))
                             for src, ss in by_rank.items()]
                    yield self._wait(procs)
                    last = self._latest(*(p.value for p in procs))
                    prev = (last, env.now)
                for s in sends:
                    self._event(("arrive", it, kind, m, s.src, s.dst)).succeed(prev)
            lasts = [e for r in w.ranks if (e := self._last_send.get((it, r))) is not None and not e.triggered]
            if lasts:  # the runtime waits for its sends to leave
                yield self._wait(lasts)
            marks = self.marks[w.id][it]
            marks["pipe_end"] = env.now
            self._event(("pipe", it, w.id)).succeed(prev)
            colls = [c for r in w.ranks for c in self.lane_colls.get((it, r), [])]
            waits = [c.done for c in colls if c.part != "ag"]
            if not overlap:
                waits.append(self._barrier(it))
            if waits:
                t_wait = env.now
                yield self._wait(waits)
                if env.now > t_wait:  # it blocked on its gradients: it wakes up later than they come
                    wake = self._collective_extra(("resume", "grad", it, w.id), w.ranks)
                    if wake > 0:
                        yield env.timeout(wake)
            marks["opt_start"] = env.now
            i = self._begin(w.id, "compute", "optimizer", "optimizer step",
                            self._latest(prev, *(e.value for e in waits)), it)
            yield self.compute.run(w.id, w.optimizer_s)
            prev = self._end(i)
            gathers = [c.done for c in colls if c.part == "ag"]
            if gathers:  # zero1: the updated parameter shards come back before the next step
                self._event(("stepped", it, w.id)).succeed(prev)
                yield self._wait(gathers)
                prev = (self._latest(prev, *(e.value for e in gathers)), env.now)
            marks["opt_end"] = env.now
            self._event(("tail", it, w.id)).succeed(prev)
            loss = self._loss(it)
            yield loss
            prev = loss.value
            # each rank leaves the loss all-reduce on its own: the next step's first sync
            # waits for the rank that left it last
            wake = self._collective_extra(("resume", "loss", it, w.id), w.ranks)
            if wake > 0:
                yield env.timeout(wake)
            marks["end"] = env.now
            self.iteration_ends[it] = max(self.iteration_ends[it], env.now)
            if it + 1 < self.opts.iterations:
                self.marks[w.id][it + 1]["start"] = env.now
        self._finished.add(w.id)

    def _collective_extra(self, key: tuple, devices) -> float:
        """With noise: the seconds a rank (of the group `devices`) takes to go on after a
        wait (`key`: which one, of which iteration, which group), drawn from an exponential
        distribution of the group's largest measured mean (``DeviceType.collective_extra_us``);
        0 without."""
        if not self.noisy:
            return 0.0
        mean = max((self.cluster.device_types[self.cluster.device(d).type].collective_extra_us for d in devices),
                   default=0.0) * 1e-6
        if mean <= 0:
            return 0.0
        return random.Random(f"{self.opts.seed}:{key}").expovariate(1.0 / mean)

    def _loss(self, it: int) -> simpy.Event:
        """Fires when iteration `it`'s loss all-reduce over every device has ended: it
        starts when the last device has stepped (hetalloc.evaluate.loss_reduction_time)."""
        key = ("loss", it)
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = self.env.event()
            self.env.process(self._loss_reduction(it, ev))
        return ev

    def _loss_reduction(self, it: int, done: simpy.Event):
        tails = [self._event(("tail", it, d)) for d in self.work]
        yield self.env.all_of(tails)
        cause = self._latest(*(e.value for e in tails))
        acts = [self._begin(d, "collective", "loss", f"loss all-reduce ({len(self.plan.device_ids())} devices)",
                            cause, it) for d in self.work]
        devices = list(self.work)
        self.compute.comm_begin(devices, "collective")
        yield self.env.timeout(self.loss_time)
        self.compute.comm_end(devices, "collective")
        for i in acts:
            self._end(i)
        done.succeed((acts[0], self.env.now))

    def _barrier(self, it: int) -> simpy.Event:
        """Fires when the pipeline phase of iteration `it` has ended on every device."""
        key = ("barrier", it)
        ev = self._events.get(key)
        if ev is None:
            pipes = [self._event(("pipe", it, d)) for d in self.work]
            ev = self._events[key] = self.env.event()
            self.env.all_of(pipes).callbacks.append(
                lambda _c: ev.succeed((self._latest(*(e.value for e in pipes)), self.env.now)))
        return ev

    def _lane(self, device: str):
        """A device's p2p lane: its sends, one after another, in the order issued."""
        store = self.lanes[device]
        w = self.work[self.rep_of[device]]
        prev = (-1, 0.0)
        while True:
            it, kind, m, s, issued = yield store.get()
            name = f"{kind} mb{m} {s.src} -> {s.dst}" if len(w.ranks) > 1 else f"{kind} mb{m} -> {s.dst}"
            i = self._begin(w.id, "p2p", "send", name, self._latest(issued, prev), it, usage=s.usage.key,
                            rank=self.rank_index[device])
            yield from self._transfer(s)
            prev = self._end(i)
            self._event(("arrive", it, kind, m, device, s.dst)).succeed(prev)

    def _ready_marks(self, w: DeviceWork, it: int, op: int, factor: float = 1.0,
                     layers: list[float] | None = None) -> list:
        """For the device's last backward: after how much of its work (its layers' times
        `layers`, default the warm ones, x `factor`, the iteration's noise) each of its
        buckets is ready (the backward runs from the stage's last layer down to its first)."""
        layers = layers or w.bwd_layer_s
        marks = []
        for r in w.ranks:
            for c in self.lane_colls.get((it, r), []):
                if c.part == "ag":
                    continue
                done = factor * sum(layers[c.bucket.start - w.start:])
                ev = self._event(("ready", c.key, r))
                marks.append((done, lambda ev=ev: ev.succeed((op, self.env.now))))
        return marks

    def _collective(self, c: Collective, it: int):
        env = self.env
        if c.part == "ag":
            ready = [self._event(("stepped", it, w)) for w in dict.fromkeys(self.rep_of[d] for d in c.members)]
        elif self.opts.overlap:
            ready = [self._event(("ready", c.key, d)) for d in c.members]
        else:
            ready = [self._barrier(it)]
        deps = ready + c.prev
        yield self._wait(deps)
        cause = self._latest(*(d.value for d in deps))
        g = self.groups[c.group]
        nbytes = c.bucket.nbytes
        kind, what = {"all": ("allreduce", "allreduce"), "rs": ("reducescatter", "reduce-scatter"),
                      "ag": ("allgather", "all-gather")}[c.part]
        part = f", slice {g.slice + 1}/{g.slices}" if g.slices > 1 else ""
        name = (f"{what} L{c.bucket.start}-{c.bucket.stop - 1} ({self.plan.grad_sync}, "
                f"{len(g.devices)} devices{part}, {nbytes / 2**20:.1f} MiB)")
        acts = [self._begin(self.rep_of[d], "collective", kind, name, cause, it, group=c.group,
                            rank=self.rank_index[d]) for d in c.members]
        t0 = env.now
        steps = self.part_steps[(c.group, c.part)]
        who = list(dict.fromkeys(self.rep_of[d] for d in c.members))  # the simulated groups it meets
        self.compute.comm_begin(who, "collective")
        busy = self.compute.busy_marks(who)
        if nbytes > 0 and self.net is not None:
            extra, byte_scale, lat_scale = self._measured_fit(c) or (0.0, 1.0, 1.0)
            if extra > 0:
                yield env.timeout(extra)
            for st in steps:
                t1 = env.now
                yield env.timeout(st.latency_s * lat_scale)
                yield self._wait([self.net.transfer(u, f * nbytes * byte_scale) for u, f in st.flows])
                if self.opts.record:
                    c.steps.append((st.phase, t1, env.now))
        elif nbytes > 0:
            yield env.timeout(self._collective_time(c))
            for st in steps:
                for u, f in st.flows:
                    self.log.record(u, t0, env.now, f * nbytes)
        if busy:
            extra = self.compute.comm_extra(who, "collective", busy)
            if extra > 0:
                yield env.timeout(extra)
        self.compute.comm_end(who, "collective")
        for i in acts:
            self._end(i)
        c.done.succeed((acts[0], env.now))

    def _plan_collectives(self) -> None:
        opts = self.opts
        for it in range(opts.iterations):
            for gi, g in enumerate(self.groups):
                if opts.overlap:
                    bs = buckets(gi, g.start, g.stop, self.cg, self.plan.precision, opts.bucket_bytes)
                    if g.slices > 1:  # a slice's buckets hold its share of the layers' gradients
                        bs = [Bucket(gi, b.start, b.stop, b.nbytes * g.nbytes / sum(x.nbytes for x in bs)) for b in bs]
                else:
                    bs = [Bucket(gi, g.start, g.stop, g.nbytes)]
                members = list(dict.fromkeys(self.rank_rep[d] for d in g.devices))
                for part in self.parts:
                    for k, b in enumerate(bs):
                        self.collectives.append(Collective((it, gi, part, k), gi, b, members, g.devices,
                                                           self.env.event(), part=part))
        # Each device issues its collectives in reverse layer order (a total order, so no
        # two devices can wait on each other in a cycle); zero1's all-gathers come last.
        for c in sorted(self.collectives, key=lambda c: (c.key[0], c.part == "ag", -c.bucket.stop, -c.bucket.start,
                                                         c.key)):
            for d in c.members:
                lane = self.lane_colls.setdefault((c.key[0], d), [])
                if lane:
                    c.prev.append(lane[-1].done)
                lane.append(c)

    # ---- run ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        env = self.env
        self._plan_collectives()
        self.table.reduce(self.topo.capacity)
        for w in self.work.values():
            self.marks[w.id][0]["start"] = 0.0
            if self.opts.overlap:
                for r in w.ranks:
                    self.lanes[r] = simpy.Store(env)
                    env.process(self._lane(r))
            env.process(self._device(w))
        for c in self.collectives:
            env.process(self._collective(c, c.key[0]))
        env.run()
        if len(self._finished) < len(self.work) or any(not c.done.triggered for c in self.collectives):
            raise SpecError(self.plan.source or "plan", "schedule", "the simulation stalled before the iteration ended",
                            "check the plan's stage wiring (every stage must split the same micro-batch)")
        return SimResult(
            plan=self.plan, cluster=self.cluster, cg=self.cg, options=self.opts, topo=self.topo, table=self.table,
            log=self.log, work=self.work, rep_of=self.rep_of, chains=self.chains, classes=self.classes,
            activities=self.acts, memory_events=self.mem, iteration_ends_s=self.iteration_ends, groups=self.groups,
            collective_steps=self.steps, collectives=self.collectives, num_events=env.num_events,
            wall_s=time.perf_counter() - t_wall, network_solves=self.net.solves if self.net else 0,
            marks=self.marks, loss_time_s=self.loss_time, noisy=self.noisy)
