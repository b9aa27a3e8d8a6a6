"""The shared cost formulas: written once here, optimised by the allocator and played
out in time by the simulator. Nothing else in the project may re-derive these costs.

Units: seconds, bytes, bytes/s. A link is a ``LinkSpec`` (bandwidth per direction and
latency). Every formula is checked against a hand calculation in tests/test_costs.py.

- p2p: latency + bytes / bandwidth.
- ring all-reduce over n devices: 2(n-1)/n * bytes / min-bandwidth + 2(n-1) * latency
  (reduce-scatter then all-gather, each n-1 steps; Patarasuk & Yuan 2009).
- hierarchical all-reduce: intra-node reduce-scatter, inter-node ring all-reduce of each
  GPU's 1/g shard (all g GPUs of a node drive the node's NIC together, so the NIC carries
  the whole buffer), intra-node all-gather:
  2(g-1)/g * bytes / bw_intra + 2(g-1) lat_intra + 2(K-1)/K * bytes / bw_nic + 2(K-1) lat_nic.
- sharded parameter server (push-pull): every worker owns 1/n of the gradients; it pushes
  the other n-1 shards to their owners and pulls the updated ones back. A worker's
  off-node traffic shares its node's NIC with the g workers on that node:
  2 * max_w [lat + max(on_node_bytes_w / bw_intra, off_node_bytes_w * g_w / bw_nic)].
- memory of a device: weights + gradients + optimizer state for its layers (bytes per
  parameter by precision and optimizer, ZeRO paper table: mixed precision AdamW = 16),
  plus saved activations of its share for every micro-batch in flight (GPipe: all M;
  1F1B: num_stages - stage_index, at most M), plus the largest output buffer.
- optimizer step: reads and writes weights, gradients and state once: bytes / memory bandwidth.
- inputs: a first or last stage's rank builds its samples' inputs or labels at the start
  of the step: data_us + samples x data_sample_us (measured); middle stages none.
- collectives over a ring of n (per-hop latency a, bandwidth b; the shape the measured
  tables are scaled with): all-reduce 2(n-1) a + 2(n-1)/n B/b; reduce-scatter and
  all-gather (n-1) a + (n-1)/n B/b (B: the whole buffer); broadcast and reduce as a
  binomial tree, ceil(log2 n) (a + B/b).
- measured collectives (``hetalloc profile``): the time measured for that operation, group
  size and link class, interpolated linearly between the measured message sizes (the
  smallest size's time below it, the last segment's slope above the largest); for a group
  size that was not measured, the nearest measured size's time scaled by the ring formula
  above (fitted per hop): t(n, B) = t_meas(m, B) * ring(n, B) / ring(m, B).
- the end-of-step loss reduction: an all-reduce of the loss (LOSS_BYTES) over every
  device of the plan, after the last optimizer step. Measured where the cluster has a
  table for it; else latency-bound, by recursive doubling as libraries do for small
  messages (Thakur, Rabenseifner & Gropp 2005): ceil(log2 n) (latency + bytes / bandwidth).

Plan space v2 (tensor parallelism, recomputation, sharded optimizer state):
- tensor-parallel compute: a layer split over t devices of one type runs its work at 1/t
  per device at a per-(type, t) efficiency e_t:
  time_t = fixed + (time_1 - fixed) / (t * e_t), fixed = the layer's kernel-launch time.
- tensor-parallel communication (Megatron-LM: Shoeybi et al. 2019, section 3; Narayanan et
  al. 2021, section 3.2): a transformer block all-reduces its b*s*h activations twice in
  the forward (after attention, after the MLP) and twice in the backward, among the t
  devices of its group over their intra-node link; each is a ring all-reduce (above). Per
  block and micro-batch a device sends 4 * 2(t-1)/t * b*s*h*p bytes (8bsh(t-1)/t
  elements, Narayanan et al.).
- memory with tensor parallelism: weights, gradients and optimizer state of the split
  parameters divided by t, replicated ones (norms, output biases) kept whole:
  (params - replicated) / t + replicated. Activations per Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eqs. 1-2): a block
  saves sbh(34 + 5as/h) bytes per layer (16-bit), with t-way tensor parallelism
  sbh(10 + 24/t + 5as/(ht)) (the 10sbh is replicated); full recomputation keeps only the
  block input, 2sbh, and rebuilds one block's activations at a time in the backward.
- zero1 (ZeRO stage 1, Rajbhandari et al. 2020): the optimizer state (and the optimizer
  step) divided by the data-parallel degree d; gradients are reduce-scattered before the
  step and the parameters all-gathered after it. Each of the two is half of the
  all-reduce formula of every algorithm above (ring: (n-1)/n * bytes / bw + (n-1) lat).
- recomputation time: the forward of the recomputed layers runs again inside the
  backward (with its tensor-parallel all-reduces).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .catalog import DeviceType

SCHEDULES = ("gpipe", "1f1b")
GRAD_SYNC = ("ring", "hierarchical", "param_server")
OPTIMIZERS = ("adamw", "sgd")
TP_DEGREES = (1, 2, 4, 8)
RECOMPUTE = ("none", "full")
OPTIMIZER_SHARDING = ("none", "zero1")

MEMORY_RESERVE_FRACTION = 0.10
"""Share of device memory kept free for the CUDA/ROCm context, allocator fragmentation
and workspaces; plans never use it."""


# ---- bytes per parameter ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ParamBytes:
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def param_bytes(precision: str, optimizer: str) -> ParamBytes:
    """Bytes per parameter: mixed precision keeps 16-bit weights and gradients plus fp32
    master weights in the optimizer state (Rajbhandari et al. 2020, ZeRO, section 3.1)."""
    if precision == "fp32":
        state = 8 if optimizer == "adamw" else 4  # Adam m and v; SGD momentum
        return ParamBytes(4, 4, state)
    state = 12 if optimizer == "adamw" else 8  # fp32 master copy + m, v (or momentum)
    return ParamBytes(2, 2, state)


def grad_bytes_per_param(precision: str) -> int:
    """Bytes per parameter that gradient synchronisation moves."""
    return 4 if precision == "fp32" else 2


# ---- time --------------------------------------------------------------------------------

def p2p_time(nbytes: float, bandwidth: float, latency: float) -> float:
    """Time to move nbytes over a path (0 bytes costs nothing)."""
    if nbytes <= 0:
        return 0.0
    return latency + nbytes / bandwidth


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of nbytes among n devices over links of the given bottleneck."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


def hierarchical_allreduce_time(nbytes: float, per_node: list[int], intra_bw: float, intra_lat: float,
                                inter_bw: float, inter_lat: float) -> float:
    """Reduce-scatter in each node, ring across nodes, all-gather in each node.

    per_node: devices of the group on each node; intra_* is the slowest node's intra
    link; inter_* the slowest NIC path among the nodes.
    """
    n = sum(per_node)
    if n <= 1 or nbytes <= 0:
        return 0.0
    k = len(per_node)
    g = max(per_node)
    t = 0.0
    if g > 1:
        t += 2.0 * (g - 1) / g * nbytes / intra_bw + 2.0 * (g - 1) * intra_lat
    if k > 1:
        t += 2.0 * (k - 1) / k * nbytes / inter_bw + 2.0 * (k - 1) * inter_lat
    return t


def param_server_time(nbytes: float, per_node: list[int], intra_bw: float, intra_lat: float,
                      inter_bw: float, inter_lat: float) -> float:
    """Sharded push-pull parameter server among the group's devices (see module doc)."""
    n = sum(per_node)
    if n <= 1 or nbytes <= 0:
        return 0.0
    shard = nbytes / n
    worst = 0.0
    for g in per_node:
        on = (g - 1) * shard
        off = (n - g) * shard
        t_on = on / intra_bw if on else 0.0
        t_off = off * g / inter_bw if off else 0.0
        lat = inter_lat if off else intra_lat
        worst = max(worst, lat + max(t_on, t_off))
    return 2.0 * worst


COLLECTIVE_OPS = ("allreduce", "reduce_scatter", "all_gather", "broadcast", "reduce")
LOSS_BYTES = 8
"""The runtime's end-of-step loss: one float64, all-reduced over every rank."""


def collective_multipliers(op: str, n: int) -> tuple[float, float]:
    """(latency multiplier, byte multiplier) of `op` among n devices (module doc)."""
    if n <= 1:
        return 0.0, 0.0
    if op == "allreduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    if op in ("reduce_scatter", "all_gather"):
        return float(n - 1), (n - 1) / n
    if op in ("broadcast", "reduce"):
        k = float(math.ceil(math.log2(n)))
        return k, k
    raise ValueError(f"unknown collective '{op}'; use one of {', '.join(COLLECTIVE_OPS)}")


def collective_time(op: str, nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """`op` over n devices with per-hop `bandwidth` and `latency` (module doc); the ring
    all-reduce is ``ring_allreduce_time``."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    lm, bm = collective_multipliers(op, n)
    return lm * latency + bm * nbytes / bandwidth


def small_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """All-reduce of a small message among n devices by recursive doubling:
    ceil(log2 n) rounds of (latency + bytes / bandwidth) (module doc)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return math.ceil(math.log2(n)) * (latency + nbytes / bandwidth)


def interpolated_time(sizes_bytes: list[float], times_s: list[float], nbytes: float) -> float:
    """A measured time-by-size table read at nbytes: linear between measured sizes, the
    smallest size's time below it, the last segment's slope (never negative) above the
    largest. Sizes ascending."""
    if nbytes <= sizes_bytes[0] or len(sizes_bytes) == 1:
        return times_s[0]
    k = min(bisect.bisect_left(sizes_bytes, nbytes), len(sizes_bytes) - 1)
    x0, x1, t0, t1 = sizes_bytes[k - 1], sizes_bytes[k], times_s[k - 1], times_s[k]
    slope = (t1 - t0) / (x1 - x0)
    if nbytes > x1:
        slope = max(slope, 0.0)
    return t0 + slope * (nbytes - x0)


def measured_collective_time(op: str, nbytes: float, n: int, measured_n: int, sizes_bytes: list[float],
                             times_s: list[float], hop_bandwidth: float, hop_latency: float) -> float:
    """`op` of nbytes among n devices from a table measured among `measured_n` devices
    (with its fitted per-hop figures, for scaling to other group sizes; module doc)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    t = interpolated_time(sizes_bytes, times_s, nbytes)
    if n == measured_n:
        return t
    ref = collective_time(op, nbytes, measured_n, hop_bandwidth, hop_latency)
    return t * collective_time(op, nbytes, n, hop_bandwidth, hop_latency) / ref if ref > 0 else t


def quantile_value(quantiles: tuple[float, ...] | list[float], u: float) -> float:
    """The value at level u (0..1) of a distribution given by its quantiles at evenly
    spaced levels 0, 1/k, ..., 1 (k + 1 values, ascending): linear between neighbouring
    levels (the inverse of a piecewise-linear distribution function). With u uniform on
    [0, 1) it draws from that distribution (the simulator's compute noise,
    ``DeviceType.compute_quantiles``)."""
    k = len(quantiles) - 1
    if k < 1:
        raise ValueError("quantiles must hold at least 2 values.")
    x = min(max(u, 0.0), 1.0) * k
    i = min(int(x), k - 1)
    return quantiles[i] + (x - i) * (quantiles[i + 1] - quantiles[i])


def input_time(samples: float, dtype: DeviceType) -> float:
    """Seconds a rank of a first or last stage spends at the start of its step building
    its inputs or labels for `samples` samples (its share x the micro-batches):
    data_us + samples x data_sample_us of its device type (measured by ``hetalloc
    profile``; 0 unmeasured). Ranks of middle stages build none (pass 0 samples)."""
    if samples <= 0:
        return 0.0
    return (dtype.data_us + samples * dtype.data_sample_us) * 1e-6


def optimizer_time(params: float, dtype: DeviceType, precision: str, optimizer: str) -> float:
    """The end of a device's step: one optimizer step over `params` parameters
    (memory-bound read+write of all state) plus the runtime's own per-step time on that
    device (``DeviceType.step_overhead_us``, measured by ``hetalloc profile``; 0 unmeasured).
    With zero1 a device steps only its shard: pass ``zero1_params(params, d)``."""
    pb = param_bytes(precision, optimizer)
    return 2.0 * params * pb.total / dtype.mem_bandwidth_bytes_per_s + dtype.step_overhead_s


# ---- tensor parallelism, recomputation, zero1 ----------------------------------------------

def tp_share(total: float, replicated: float, tp: int) -> float:
    """One tensor-parallel rank's part of a quantity (parameters, saved activation bytes)
    that is split `tp` ways except its `replicated` part: (total - replicated)/tp + replicated."""
    if tp == 1:
        return total
    return (total - replicated) / tp + replicated


def tp_layer_time(time_s: float, tp: int, efficiency: float, fixed_s: float = 0.0) -> float:
    """Seconds of one pass of a layer split over `tp` devices, from its one-device time:
    fixed_s + (time_s - fixed_s) / (tp * efficiency). `fixed_s` is the part that does not
    shrink (kernel launches); `efficiency` the per-(type, tp) factor (catalog default
    ``DEFAULT_TP_EFFICIENCY``, overridden by a cost graph's ``tp_efficiency``)."""
    if tp == 1:
        return time_s
    return fixed_s + (time_s - fixed_s) / (tp * efficiency)


def tp_comm_time(num_allreduces, nbytes, tp: int, bandwidth: float, latency: float):
    """Seconds of `num_allreduces` ring all-reduces moving `nbytes` in total (each its
    micro-batch share's b*s*h*p activations) among the `tp` devices of a tensor-parallel
    group over their intra-node link: 2(t-1)/t * nbytes / bandwidth + num * 2(t-1) * latency,
    the sum of ``ring_allreduce_time`` over the all-reduces (Megatron-LM: a block makes 2 in
    its forward and 2 in its backward; Shoeybi et al. 2019, Narayanan et al. 2021). Zero
    without all-reduces or bytes. Numbers, or numpy arrays (element by element)."""
    if tp <= 1:
        return 0.0
    t = 2.0 * (tp - 1) / tp * nbytes / bandwidth + num_allreduces * 2.0 * (tp - 1) * latency
    if np.ndim(t) == 0:
        return float(t) if num_allreduces > 0 and nbytes > 0 else 0.0
    return np.where((np.asarray(num_allreduces) > 0) & (np.asarray(nbytes) > 0), t, 0.0)


def recompute_backward_time(fwd_s: float, bwd_s: float) -> float:
    """Backward seconds with full recomputation: the recomputed layers' forward runs again
    inside the backward (Chen et al. 2016; Korthikanti et al. 2022, section 3)."""
    return fwd_s + bwd_s


def layer_saved_bytes(saved: float, replicated: float, checkpoint: float, tp: int, recompute: str) -> float:
    """Bytes per sample a layer keeps per micro-batch in flight until its backward.
    recompute 'none': its saved activations, split by tensor parallelism except the
    replicated part (Korthikanti et al. 2022 eq. 2: sbh(10 + 24/t + 5as/(ht)));
    'full': only its input (``checkpoint``, 2sbh, not split without sequence parallelism)
    for layers that are recomputed (checkpoint > 0), the former for the others."""
    if recompute == "full" and checkpoint > 0:
        return checkpoint
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute '{recompute}'; use one of {', '.join(RECOMPUTE)}")
    return tp_share(saved, replicated, tp)


def zero1_params(params: float, dp_degree: int) -> float:
    """Parameters whose optimizer state (and step) one device keeps when the state is
    sharded over the `dp_degree` devices that hold the same parameters (ZeRO stage 1)."""
    if isinstance(dp_degree, np.ndarray):
        return params / np.maximum(dp_degree, 1)
    return params / max(1, dp_degree)


def zero1_halves(allreduce_s: float) -> tuple[float, float]:
    """(reduce-scatter, all-gather) seconds that replace an all-reduce under zero1: the
    gradients' reduce-scatter before the step, the updated parameters' all-gather after it
    (the same bytes in 16-bit mixed precision). Each is half of the all-reduce formula of
    every algorithm here: the ring, hierarchical and parameter-server all-reduces are a
    reduce-scatter followed by its mirror all-gather."""
    return 0.5 * allreduce_s, 0.5 * allreduce_s


# ---- memory ------------------------------------------------------------------------------

def in_flight_microbatches(schedule: str, stage_index: int, num_stages: int, num_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    if schedule == "gpipe":
        return num_microbatches
    if schedule == "1f1b":
        return min(num_microbatches, num_stages - stage_index)
    raise ValueError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    weights: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    def to_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "buffers": self.buffers, "total": self.total}


def stage_memory(params: float, saved_act_bytes_per_sample: float, out_act_bytes_per_sample: float,
                 share: int, in_flight: int, precision: str, optimizer: str, *,
                 optimizer_params: float | None = None, working_act_bytes_per_sample: float = 0.0) -> MemoryBreakdown:
    """Peak memory of a device that serves `params` parameters with `share` samples of
    each micro-batch, holding `in_flight` micro-batches of saved activations.

    optimizer_params: parameters whose optimizer state it keeps (zero1: ``zero1_params``;
    default all of `params`). working_act_bytes_per_sample: activations rebuilt for one
    micro-batch at a time in the backward (full recomputation: the largest recomputed
    layer's saved activations), held once on top of those in flight."""
    pb = param_bytes(precision, optimizer)
    opt = params if optimizer_params is None else optimizer_params
    return MemoryBreakdown(
        weights=params * pb.weights,
        grads=params * pb.grads,
        optimizer=opt * pb.optimizer,
        activations=saved_act_bytes_per_sample * share * in_flight + working_act_bytes_per_sample * share,
        buffers=2 * out_act_bytes_per_sample * share,  # send and receive buffers
    )


def usable_memory(dtype: DeviceType) -> float:
    return dtype.memory_bytes * (1.0 - MEMORY_RESERVE_FRACTION)


def max_share_for_memory(params: float, saved_act_bytes_per_sample: float, out_act_bytes_per_sample: float,
                         in_flight: int, precision: str, optimizer: str, dtype: DeviceType, *,
                         optimizer_params: float | None = None, working_act_bytes_per_sample: float = 0.0) -> int:
    """Largest share (samples per micro-batch) that fits; -1 if even the weights do not fit,
    0 if the weights fit but not one sample. Keywords as in ``stage_memory``."""
    free = _free_memory(params, precision, optimizer, dtype, optimizer_params)
    if free < 0:
        return -1
    per_sample = _bytes_per_sample(saved_act_bytes_per_sample, out_act_bytes_per_sample, in_flight,
                                   working_act_bytes_per_sample)
    if per_sample <= 0:
        return 1 << 30
    return int(math.floor(free / per_sample + 1e-9))


def max_shares_for_memory(params, saved_act_bytes_per_sample, out_act_bytes_per_sample, in_flight, precision: str,
                          optimizer: str, dtype: DeviceType, *, optimizer_params=None,
                          working_act_bytes_per_sample=0.0) -> np.ndarray:
    """``max_share_for_memory`` of many stages at once: the sizes and counts are numpy
    arrays (or numbers) broadcast against each other; shares beyond 2^30 read as 2^30."""
    free = np.asarray(_free_memory(params, precision, optimizer, dtype, optimizer_params))
    per_sample = np.asarray(_bytes_per_sample(saved_act_bytes_per_sample, out_act_bytes_per_sample, in_flight,
                                              working_act_bytes_per_sample))
    share = np.floor(np.minimum(free / np.where(per_sample > 0, per_sample, 1.0) + 1e-9, 1 << 30))
    share = np.where(per_sample > 0, share, 1 << 30)
    return np.where(free < 0, -1, share).astype(np.int64)


def _free_memory(params, precision: str, optimizer: str, dtype: DeviceType, optimizer_params):
    """Memory a stage device has left for activations once its weights, gradients and
    optimizer state are in (``stage_memory`` at share 0)."""
    fixed = stage_memory(params, 0.0, 0.0, 0, 0, precision, optimizer, optimizer_params=optimizer_params).total
    return usable_memory(dtype) - fixed


def _bytes_per_sample(saved, out, in_flight, working):
    """Bytes each sample of a share adds (``stage_memory``'s activations and buffers)."""
    return saved * in_flight + working + 2 * out
