"""Compute of the simulated devices over time: shared compute slots and interference.

A compute op is an amount of work, in seconds at the device's full speed (what the cost
graph says it takes alone). It advances at a rate that two effects lower:
- **processor sharing**: on a node with fewer compute slots than devices
  (``Node.compute_slots``: CPU cores under more ranks, or a GPU time-sliced among
  processes), the ops running at one time share the slots equally: each advances at
  min(1, slots / running);
- **interference**: while a collective (or a point-to-point transfer) of the device runs
  beside its compute, the compute advances 1 / (1 + f) as fast, f the device type's
  ``interference_collective`` (``interference_p2p``), measured by ``hetalloc profile``;
  and the other way round, a transfer or collective progresses 1 / (1 + c) as fast
  while it runs beside compute, c the type's ``comm_slowdown_collective``
  (``comm_slowdown_p2p``): what it left undone is done at its end, at that pace while
  compute goes on and at full speed once it stops (``comm_extra``: the largest over its
  devices, once, at its end; beside compute all along, it takes c x that time longer).
Where interference happens depends on what the communication needs. On a node that
declares compute slots (CPU ranks: the profile writes the host's cores) communication is
done by the ranks' threads on the same cores, so it meets compute only while every slot
of the node computes (a free core serves it untouched): "beside compute" means while the
node is saturated. On a node without (GPUs, where collectives run as kernels on the
device itself) it means while the device itself computes. The profile measures both
figures in that state (every rank of its turn computing).

Rates change only when an op starts or ends on the node or a transfer starts or ends on
the device; between those moments every op advances linearly (a fluid model, as the
links are). An op on a node with neither shared slots nor interference figures is a
plain timeout.

Never: price work here (durations come from hetalloc via simulator.pipeline); this
module only stretches them in time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import simpy

from hetalloc.cluster import Cluster

COMM_KINDS = ("collective", "p2p")


@dataclass(eq=False, slots=True)
class _Job:
    device: str
    work: float
    remaining: float
    """Seconds of full-speed work left at ``since``."""
    done: simpy.Event
    marks: list[tuple[float, Callable[[], None]]]
    """(work done, callback) still to fire, in order."""
    since: float = 0.0
    rate: float = 1.0
    version: int = 0


@dataclass(slots=True)
class _Node:
    share_slots: int
    """Slots its running ops share (processor sharing); 0: one per device."""
    cores: int
    """Slots whose saturation makes communication meet compute; 0: per device (module doc)."""
    tracked: bool = False
    """Whether its ops are tracked (else plain timeouts)."""
    efficiency: float = 1.0
    """Fraction of a slot's speed its devices get while more compute than it has slots
    (``Node.share_efficiency``)."""
    jobs: list[_Job] = field(default_factory=list)
    saturated_total: float = 0.0
    saturated_since: float | None = None


class ComputeModel:
    """Runs compute ops of the simulated devices (module doc)."""

    def __init__(self, env: simpy.Environment, cluster: Cluster, *, shared: bool, interference: bool):
        self.env = env
        self.nodes: dict[str, _Node] = {}
        self.node_of: dict[str, _Node] = {}
        self.factor: dict[str, dict[str, float]] = {}
        """Compute slowdown beside communication, per device with figures."""
        self.comm_factor: dict[str, dict[str, float]] = {}
        """Communication slowdown beside compute, per device with figures."""
        self.comm: dict[str, dict[str, int]] = {}
        self.job_of: dict[str, _Job] = {}
        self.busy_total: dict[str, float] = {}
        self.busy_since: dict[str, float | None] = {}
        for n in cluster.nodes:
            node = self.nodes[n.name] = _Node(n.compute_slots if shared and n.shares_compute else 0, n.compute_slots)
            if node.share_slots:
                node.efficiency = n.share_efficiency
            for d in n.devices:
                self.node_of[d.id] = node
                t = cluster.device_types[d.type]
                if not interference:
                    continue
                f = {"collective": t.interference_collective, "p2p": t.interference_p2p}
                if any(v > 0 for v in f.values()):
                    self.factor[d.id] = f
                c = {"collective": t.comm_slowdown_collective, "p2p": t.comm_slowdown_p2p}
                if any(v > 0 for v in c.values()):
                    self.comm_factor[d.id] = c
                self.comm[d.id] = {k: 0 for k in COMM_KINDS}
                self.busy_total[d.id], self.busy_since[d.id] = 0.0, None
            node.tracked = bool(node.share_slots) or any(d.id in self.factor or d.id in self.comm_factor
                                                         for d in n.devices)

    @property
    def active(self) -> bool:
        """Whether any op can run at other than full speed (else every op is a timeout)."""
        return any(n.tracked for n in self.nodes.values())

    # ---- compute ----------------------------------------------------------------------
    def run(self, device: str, work_s: float,
            marks: list[tuple[float, Callable[[], None]]] | None = None) -> simpy.Event:
        """An event that fires when `work_s` seconds of full-speed work have run on device;
        each mark (work done, callback) is called when that much of it has run (a
        gradient bucket that the backward has passed)."""
        marks = sorted(marks or [], key=lambda m: m[0])
        node = self.node_of[device]
        if work_s <= 0 or not node.tracked:
            for point, fn in marks:
                self.env.timeout(min(max(point, 0.0), max(work_s, 0.0))).callbacks.append(lambda _e, fn=fn: fn())
            return self.env.timeout(max(work_s, 0.0))
        now = self.env.now
        job = _Job(device, work_s, work_s, self.env.event(), marks, now)
        if device in self.busy_since:
            self.busy_since[device] = now
        node.jobs.append(job)
        self.job_of[device] = job
        self._saturation(node, now)
        self._refresh(node)
        return job.done

    def _saturated(self, node: _Node) -> bool:
        return bool(node.cores) and len(node.jobs) >= node.cores

    def _saturation(self, node: _Node, now: float) -> None:
        """Book the node's saturated time (its ops just changed)."""
        if node.saturated_since is not None and not self._saturated(node):
            node.saturated_total += now - node.saturated_since
            node.saturated_since = None
        elif node.saturated_since is None and self._saturated(node):
            node.saturated_since = now

    def _meets(self, device: str) -> bool:
        """Whether communication of the device meets compute now (module doc)."""
        node = self.node_of[device]
        return self._saturated(node) if node.cores else device in self.job_of

    def _rate(self, node: _Node, job: _Job) -> float:
        share = 1.0
        if node.share_slots and len(node.jobs) > node.share_slots:
            share = node.share_slots / len(node.jobs) * node.efficiency
        f = self.factor.get(job.device)
        if f is not None and self._meets(job.device):
            c = self.comm[job.device]
            slow = max((f[k] for k in COMM_KINDS if c[k] > 0), default=0.0)
            share /= 1.0 + slow
        return share

    def _refresh(self, node: _Node) -> None:
        """Book every running op's progress at its old rate, then re-time it at its new one."""
        now = self.env.now
        for job in node.jobs:
            job.remaining = max(0.0, job.remaining - job.rate * (now - job.since))
            job.since = now
            rate = self._rate(node, job)
            if rate == job.rate and job.version > 0:
                continue
            job.rate = rate
            job.version += 1
            self._arm(job)

    def _arm(self, job: _Job) -> None:
        """Wake at the job's next mark or its end, whichever comes first, at its rate."""
        left = job.remaining
        if job.marks:
            left = min(left, max(0.0, job.marks[0][0] - (job.work - job.remaining)))
        self.env.timeout(left / job.rate).callbacks.append(lambda _e, job=job, v=job.version: self._wake(job, v))

    def _wake(self, job: _Job, version: int) -> None:
        if version != job.version:
            return  # re-timed since
        now = self.env.now
        job.remaining = max(0.0, job.remaining - job.rate * (now - job.since))
        job.since = now
        done = job.work - job.remaining
        tol = 1e-12 * max(1.0, job.work)
        while job.marks and job.marks[0][0] <= done + tol:
            job.marks.pop(0)[1]()
        if job.remaining > tol:
            self._arm(job)
            return
        node = self.node_of[job.device]
        job.remaining = 0.0
        node.jobs.remove(job)
        if self.job_of.get(job.device) is job:
            del self.job_of[job.device]
        if self.busy_since.get(job.device) is not None:
            self.busy_total[job.device] += now - self.busy_since[job.device]
            self.busy_since[job.device] = None
        self._saturation(node, now)
        job.done.succeed()
        if node.jobs:
            self._refresh(node)

    # ---- communication ----------------------------------------------------------------
    def comm_begin(self, devices, kind: str) -> None:
        self._comm(devices, kind, +1)

    def comm_end(self, devices, kind: str) -> None:
        self._comm(devices, kind, -1)

    def _comm(self, devices, kind: str, delta: int) -> None:
        touched = []
        for d in devices:
            c = self.comm.get(d)
            if c is None:
                continue
            c[kind] += delta
            if d in self.factor and self.node_of[d].jobs and self.node_of[d] not in touched:
                touched.append(self.node_of[d])
        for node in touched:
            self._refresh(node)

    def _beside_s(self, device: str) -> float:
        """Seconds so far in which the device's communication met compute (module doc)."""
        now = self.env.now
        node = self.node_of[device]
        if node.cores:
            since = node.saturated_since
            return node.saturated_total + (now - since if since is not None else 0.0)
        since = self.busy_since[device]
        return self.busy_total[device] + (now - since if since is not None else 0.0)

    def busy_marks(self, devices) -> dict[str, float]:
        """For each device with communication slowdown figures: ``_beside_s`` now."""
        return {d: self._beside_s(d) for d in devices if d in self.comm_factor}

    def _meeting_left_s(self, device: str) -> float:
        """How long the device's communication goes on meeting compute from now if
        nothing new starts: until the running op ends (or, on a node with cores, until
        the first op ends and a core frees); 0 if it does not meet compute now."""
        if not self._meets(device):
            return 0.0
        node = self.node_of[device]
        now = self.env.now
        jobs = node.jobs if node.cores else [self.job_of[device]]
        return min(max(0.0, j.remaining - j.rate * (now - j.since)) / j.rate for j in jobs)

    def comm_extra(self, devices, kind: str, marks: dict[str, float]) -> float:
        """Seconds a transfer or collective of `kind` that began at `marks` (busy_marks)
        takes beyond its own time because it ran beside compute (module doc): beside
        compute it progresses 1 / (1 + c) as fast, so its time beside compute, o, leaves
        o c / (1 + c) of its work undone at its own end; that is done at the slow pace
        while compute goes on, at full speed once it has stopped (a transfer that ran
        beside compute all along takes c x o longer; c = the type's comm slowdown)."""
        out = 0.0
        for d, m in marks.items():
            c = self.comm_factor[d][kind]
            left = (self._beside_s(d) - m) * c / (1.0 + c)  # seconds of full-speed work undone
            if left <= 0:
                continue
            slow = self._meeting_left_s(d)
            extra = left * (1.0 + c) if left * (1.0 + c) <= slow else slow + (left - slow / (1.0 + c))
            out = max(out, extra)
        return out
