"""Pipeline execution of one rank's stage: the plan's op order with explicit p2p.

Every rank runs ``hetalloc.schedule.stage_op_order`` for its stage (GPipe or 1F1B; the
same orders the predictions and the simulator use). A forward op receives the
activations of its slice of the micro-batch from the previous stage's groups, runs the
stage, and sends each overlapping piece of its output to the next stage's groups
(``hetalloc.evaluate.slice_overlaps``: shares are consecutive slices in listed order);
a backward op does the reverse with input gradients. Between tensor-parallel groups,
every rank k of the receiving group gets the whole piece from rank k mod t of the
sending group (``hetalloc.evaluate.rank_pairs``, as the prediction times it): every
rank of a group holds the full activations and input gradients at a stage boundary.
This covers stages of different widths and uneven shares, which
torch.distributed.pipelining (one rank per stage, equal micro-batches) cannot express;
its schedules are the reference the overhead benchmark compares against
(runtime/pipelining_ref.py).

Receives are posted ``LOOKAHEAD`` ops ahead so transfers overlap compute; sends are
asynchronous and waited at the end of the step. The last stage's loss is the summed
token cross-entropy times ``loss_scale`` = 1 / (tokens in the global batch): each
device's gradients then carry its share's weight, and a plain sum over the devices that
hold a layer gives the whole-batch gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from hetalloc.evaluate import rank_pairs, slice_overlaps
from hetalloc.plan import Plan
from hetalloc.schedule import stage_op_order

from .config import Pace
from .metrics import StepTimes
from .models import StageModule, token_loss_sum
from .rankmap import RankMap

LOOKAHEAD = 2
"""Ops ahead whose receives are already posted."""


@dataclass(frozen=True, slots=True)
class StageRole:
    """Where a rank sits in the plan, and whom it exchanges activations with."""

    replica: int
    stage: int
    device_index: int
    """Index of its group within the stage."""
    share: int
    num_stages: int
    start: int
    stop: int
    recv_from: tuple[tuple[int, int], ...]
    """(source rank, samples) pieces of this rank's input slice, in order (previous stage)."""
    send_to: tuple[tuple[tuple[int, ...], int], ...]
    """(destination ranks, samples) pieces of this rank's output slice, in order (next
    stage); a piece may go to several ranks of a wider group, or to none."""
    grad_from: tuple[tuple[int, int], ...] = ()
    """(source rank, samples) pieces of the gradient of this rank's output (backward)."""
    grad_to: tuple[tuple[tuple[int, ...], int], ...] = ()
    """(destination ranks, samples) pieces of the gradient of this rank's input (backward)."""
    tp_rank: int = 0
    """Position in its tensor-parallel group (0 when alone)."""
    tp_ranks: tuple[int, ...] = ()
    """Global ranks of its group, in the group's device order."""

    @property
    def tp_size(self) -> int:
        return max(1, len(self.tp_ranks))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def stage_role(plan: Plan, rm: RankMap, rank: int) -> StageRole:
    device = rm.devices[rank]
    ri, si = plan.placement()[device]
    stages = plan.replicas[ri].stages
    s = stages[si]
    k = next(i for i, g in enumerate(s.groups) if device in g.devices)
    mine = s.groups[k]

    def sources(senders: list[str]) -> int:  # the one rank that sends this rank a piece
        return next(rm.rank_of(a) for a, b in rank_pairs(senders, mine.devices) if b == device)

    def destinations(receivers: list[str]) -> tuple[int, ...]:  # the ranks this rank sends a piece to
        return tuple(rm.rank_of(b) for a, b in rank_pairs(mine.devices, receivers) if a == device)

    recv_from, grad_to, send_to, grad_from = [], [], [], []
    if si > 0:
        prev = stages[si - 1]
        for i, j, n in slice_overlaps([g.share for g in prev.groups], [g.share for g in s.groups]):
            if j == k:
                recv_from.append((sources(prev.groups[i].devices), n))
                grad_to.append((destinations(prev.groups[i].devices), n))
    if si + 1 < len(stages):
        nxt = stages[si + 1]
        for i, j, n in slice_overlaps([g.share for g in s.groups], [g.share for g in nxt.groups]):
            if i == k:
                send_to.append((destinations(nxt.groups[j].devices), n))
                grad_from.append((sources(nxt.groups[j].devices), n))
    tp_ranks = tuple(rm.rank_of(d) for d in mine.devices) if mine.tp > 1 else ()
    return StageRole(ri, si, k, mine.share, len(stages), s.start, s.stop, tuple(recv_from), tuple(send_to),
                     tuple(grad_from), tuple(grad_to), mine.devices.index(device), tp_ranks)


def _tag(kind: str, microbatch: int) -> int:
    return 2 * microbatch + (0 if kind == "F" else 1)


@dataclass
class _InFlight:
    """What a forward op keeps for its backward."""

    inputs: torch.Tensor | None
    output: torch.Tensor


@dataclass
class PipelineExecutor:
    role: StageRole
    module: StageModule
    schedule: str
    num_microbatches: int
    activation_shape: tuple[int, ...]
    """Per-sample shape of the tensors between stages, e.g. (seq, hidden)."""
    dtype: torch.dtype
    device: torch.device
    loss_scale: float
    slowdown: float = 1.0
    order: list[tuple[str, int]] = field(init=False)
    _pace: Pace | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.order = stage_op_order(self.schedule, self.role.stage, self.role.num_stages, self.num_microbatches)

    # ---- compute, timed and (for emulated heterogeneity) stretched ---------------------
    def _timed(self, times: StepTimes, key: str, fn: Callable[[], torch.Tensor | None]):
        self._pace = Pace(self.slowdown, self.device.type == "cpu")
        try:
            out = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = self._pace.hold()
        finally:
            self._pace = None
        setattr(times, key, getattr(times, key) + dt)
        return out

    def hold(self) -> None:
        """Inside an op (a gradient bucket ready): hold the emulated slowdown up to here
        (runtime.config.Pace); nothing outside an op or without a slowdown."""
        if self._pace is not None and self._pace.slowdown > 1.0:  # else nothing to hold (and no sync on GPUs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._pace.hold()

    # ---- p2p ------------------------------------------------------------------------
    def _post_recvs(self, kind: str, m: int) -> list[tuple[torch.Tensor, dist.Work]]:
        peers = self.role.recv_from if kind == "F" else self.role.grad_from
        out = []
        for peer, n in peers:
            buf = torch.empty((n, *self.activation_shape), dtype=self.dtype, device=self.device)
            out.append((buf, dist.irecv(buf, src=peer, tag=_tag(kind, m))))
        return out

    def _send(self, kind: str, m: int, tensor: torch.Tensor, sends: list[tuple[dist.Work, torch.Tensor]]) -> None:
        peers = self.role.send_to if kind == "F" else self.role.grad_to
        pieces = tensor.detach().split([n for _, n in peers])
        for (dests, _), piece in zip(peers, pieces):
            if dests:
                piece = piece.contiguous()
            for peer in dests:
                sends.append((dist.isend(piece, dst=peer, tag=_tag(kind, m)), piece))  # keep the piece alive

    @staticmethod
    def _wait(recvs: list[tuple[torch.Tensor, dist.Work]], times: StepTimes) -> torch.Tensor:
        t0 = time.perf_counter()
        for _, work in recvs:
            work.wait()
        times.p2p_wait_s += time.perf_counter() - t0
        bufs = [b for b, _ in recvs]
        return bufs[0] if len(bufs) == 1 else torch.cat(bufs)

    # ---- one step -------------------------------------------------------------------
    def run_step(self, inputs: list[torch.Tensor | None], labels: list[torch.Tensor | None], times: StepTimes,
                 before_last_backward: Callable[[], None]) -> torch.Tensor:
        """Run every op of this stage for one step; returns the summed scaled loss of the
        micro-batches this rank finished (zero unless it is a last stage; on tensor-parallel
        rank 0 only, so that a sum over ranks counts each sample once)."""
        role = self.role
        posted: dict[tuple[str, int], list] = {}
        next_post = 0
        in_flight: dict[int, _InFlight] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)

        def post_upto(j: int) -> None:
            nonlocal next_post
            for kind, m in self.order[next_post:j + 1]:
                needs = (kind == "F" and not role.is_first) or (kind == "B" and not role.is_last)
                posted[(kind, m)] = self._post_recvs(kind, m) if needs else []
            next_post = max(next_post, j + 1)

        for i, (kind, m) in enumerate(self.order):
            post_upto(i + LOOKAHEAD)
            if kind == "F":
                if role.is_first:
                    x = inputs[m]
                else:
                    x = self._wait(posted[(kind, m)], times).requires_grad_()
                if role.is_last:
                    out = self._timed(times, "forward_s",
                                      lambda: token_loss_sum(self.module(x), labels[m]) * self.loss_scale)
                    if role.tp_rank == 0:
                        loss_total += out.detach().double()
                else:
                    out = self._timed(times, "forward_s", lambda: self.module(x))
                    self._send("F", m, out, sends)
                in_flight[m] = _InFlight(None if role.is_first else x, out)
            else:
                state = in_flight.pop(m)
                grad = None if role.is_last else self._wait(posted[(kind, m)], times)
                if i == len(self.order) - 1:
                    before_last_backward()
                self._timed(times, "backward_s", lambda: torch.autograd.backward(state.output, grad))
                if state.inputs is not None:
                    self._send("B", m, state.inputs.grad, sends)
            del posted[(kind, m)]
        t0 = time.perf_counter()
        for work, _ in sends:
            work.wait()
        times.p2p_wait_s += time.perf_counter() - t0
        return loss_total

    def run_forward(self, inputs: list[torch.Tensor | None], labels: list[torch.Tensor | None], times: StepTimes,
                    loss_scale: float) -> torch.Tensor:
        """Forward only (evaluation): every micro-batch through this stage in order, in
        eval mode, without autograd; returns the summed loss x loss_scale of the
        micro-batches this rank finished (zero unless it is a last stage's tensor-parallel
        rank 0)."""
        role, M = self.role, self.num_microbatches
        posted: dict[int, list] = {}
        next_post = 0
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                for m in range(M):
                    while not role.is_first and next_post < min(M, m + LOOKAHEAD + 1):
                        posted[next_post] = self._post_recvs("F", next_post)
                        next_post += 1
                    x = inputs[m] if role.is_first else self._wait(posted.pop(m), times)
                    out = self._timed(times, "forward_s", lambda: self.module(x))
                    if role.is_last:
                        loss = token_loss_sum(out, labels[m]).double() * loss_scale  # every TP rank: collectives
                        if role.tp_rank == 0:
                            total += loss
                    else:
                        self._send("F", m, out, sends)
        finally:
            self.module.train(training)
        t0 = time.perf_counter()
        for work, _ in sends:
            work.wait()
        times.p2p_wait_s += time.perf_counter() - t0
        return total
