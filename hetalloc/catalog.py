"""Built-in catalog of accelerator and link types, with the source of every figure.

Figures are vendor peak numbers (dense, no structured sparsity) for the 16-bit tensor
path used in mixed-precision training (bf16 where the chip has it, fp16 otherwise,
with fp32 accumulation on consumer parts). Bandwidths are per direction.

Units: TFLOP/s (1e12), GiB (2**30 bytes) of device memory, GB/s (1e9 bytes/s),
microseconds of latency, US dollars per device-hour.

Prices are on-demand list prices per GPU of a representative public-cloud instance
(instance price / GPUs per instance) as published by the provider in 2024; they are
rough and meant to be overridden (``cost_per_hour_usd`` in a cluster file).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class DeviceType:
    """An accelerator model."""

    name: str
    vendor: str
    peak_tflops: float
    """Peak dense 16-bit tensor throughput, TFLOP/s."""
    memory_gib: float
    """Device memory, GiB."""
    mem_bandwidth_gbps: float
    """Device memory bandwidth, GB/s."""
    cost_per_hour_usd: float = 0.0
    """Rough on-demand price per device-hour (0 = unknown)."""
    source: str = ""
    op_overhead_us: float = 0.0
    """The runtime's own time per pipeline op (one forward or one backward of a stage)
    besides the layers' compute: dispatch, posting transfers, bookkeeping. Measured by
    ``hetalloc profile`` (running the runtime); 0 for catalog devices (not measured)."""
    op_compute_us: float = 0.0
    """Compute a pipeline op of the runtime takes beyond the sum of its layers' times as
    the profile measured them one pass at a time (starting a stage's forward and its
    autograd backward, caches as a schedule leaves them), per op, measured by
    ``hetalloc profile`` (its two short training runs: measured minus profiled compute
    per op); booked as compute. 0 for catalog devices."""
    compute_noise: float = 0.0
    """Step-to-step spread of a rank's compute in a training run on the device: the
    standard deviation of log(step compute / its median), measured by ``hetalloc
    profile`` (its two short training runs). The simulator draws each rank's compute of
    each step from it (from ``compute_quantiles`` where a profile gave them), so that the
    collectives that wait for every rank (the loss and gradient all-reduces, a pipeline's
    receives) wait for the late ones as in a run. 0 for catalog devices (deterministic)."""
    compute_quantiles: tuple[float, ...] = ()
    """The measured step-to-step distribution of a rank's compute: quantiles at evenly
    spaced levels (0, 1/k, ..., 1: the least and the largest included) of log(step
    compute / its median) of the type's ranks in the profile's training runs, ascending. Where given, the simulator draws each rank's compute factor from it
    (``hetalloc.costs.quantile_value``), so that its tails, which a normal of
    ``compute_noise`` leaves out, make the late rank of a sync as late as in a run.
    Empty for catalog devices."""
    collective_extra_us: float = 0.0
    """Mean time a collective of the device takes in a training run beyond its measured
    table time (threads woken from idle, not a hot loop of calls): the end-of-step loss
    all-reduce's own time in the profile's training runs (per step, the rank that came
    last) minus the table's, averaged over the steps, measured by ``hetalloc profile``.
    The simulator's noise draws each collective's extra from an exponential distribution
    of this mean. 0 for catalog devices."""
    step_overhead_us: float = 0.0
    """The runtime's own time per training step on the device besides its ops, the
    optimizer and its inputs: gradient zeroing, bookkeeping. Measured by ``hetalloc
    profile``; 0 for catalog devices."""
    data_us: float = 0.0
    """Time per step a rank of a first or last stage takes to build its inputs or labels
    (``hetalloc.costs.input_time``), besides ``data_sample_us`` per sample. Measured by
    ``hetalloc profile`` (its two short training runs); 0 for catalog devices."""
    data_sample_us: float = 0.0
    """... and per sample of its step (share x micro-batches): the runtime builds every
    sample at the start of the step (here about 24 µs a sample)."""
    interference_collective: float = 0.0
    """How much slower compute runs while a collective of the device runs beside it
    (0.2: 20 % slower), measured by ``hetalloc profile`` (a matmul with and without
    all-reduces in flight); 0 for catalog devices (not measured)."""
    interference_p2p: float = 0.0
    """The same while a point-to-point transfer of the device runs beside its compute."""
    comm_slowdown_collective: float = 0.0
    """The other way round: how much longer a collective of the device takes for the time
    the device computes beside it (0.5: each second of overlap adds half a second),
    measured by ``hetalloc profile`` (the all-reduce stream with and without a matmul
    beside it); 0 for catalog devices."""
    comm_slowdown_p2p: float = 0.0
    """The same for a point-to-point transfer the device sends or receives."""

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def mem_bandwidth_bytes_per_s(self) -> float:
        return self.mem_bandwidth_gbps * 1e9

    @property
    def op_overhead_s(self) -> float:
        """Seconds every pipeline op takes beyond its layers' profiled times (what the
        formulas add per op: ``CostGraph.range_time``): the runtime's own time and the
        op's extra compute."""
        return (self.op_overhead_us + self.op_compute_us) * 1e-6

    @property
    def op_runtime_s(self) -> float:
        """Of ``op_overhead_s``, the runtime's own time (booked as 'other', not compute)."""
        return self.op_overhead_us * 1e-6

    @property
    def step_overhead_s(self) -> float:
        return self.step_overhead_us * 1e-6


@dataclass(frozen=True, slots=True)
class LinkType:
    """An interconnect: a GPU's link inside a node, or a node's network interface."""

    name: str
    bandwidth_gbps: float
    """Bandwidth per direction, GB/s (gigabytes)."""
    latency_us: float
    """One-way small-message latency, microseconds (what NCCL/gloo typically see)."""
    source: str = ""

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


DEFAULT_TP_EFFICIENCY: dict[int, float] = {1: 1.0, 2: 0.95, 4: 0.90, 8: 0.85}
"""Compute efficiency of a layer split over t tensor-parallel devices, relative to t times
its speed on one device (the same for every type). An assumption, not a measurement:
matmuls 1/t as wide reach a lower fraction of peak (smaller tiles, the same number of
kernel launches). The all-reduces are priced separately (``hetalloc.costs.tp_comm_time``);
for scale, Shoeybi et al. 2019 report 77 % weak-scaling efficiency at t = 8 *with* them.
A cost graph's ``tp_efficiency`` table (per type, from profiling or by hand) overrides it."""

_NV = "NVIDIA datasheet"
DEVICE_TYPES: dict[str, DeviceType] = {
    d.name: d
    for d in [
        # P100 SXM2: 21.2 TFLOP/s fp16, 16 GB HBM2 at 732 GB/s (Tesla P100 datasheet).
        DeviceType("P100", "nvidia", 21.2, 16, 732, 1.46, f"{_NV} Tesla P100 SXM2; price GCP n1+P100"),
        # V100 SXM2: 125 TFLOP/s tensor, 900 GB/s (Tesla V100 datasheet); p3.16xlarge $24.48/8.
        DeviceType("V100-16G", "nvidia", 125, 16, 900, 3.06, f"{_NV} Tesla V100 SXM2; AWS p3.16xlarge/8"),
        DeviceType("V100-32G", "nvidia", 125, 32, 900, 3.90, f"{_NV} Tesla V100 SXM2 32GB; AWS p3dn.24xlarge/8"),
        # T4: 65 TFLOP/s fp16 tensor, 16 GB at 320 GB/s; g4dn.xlarge $0.526.
        DeviceType("T4", "nvidia", 65, 16, 320, 0.53, f"{_NV} T4; AWS g4dn.xlarge"),
        # L4: 121 TFLOP/s bf16 dense (242 sparse), 24 GB at 300 GB/s; g6.xlarge $0.805.
        DeviceType("L4", "nvidia", 121, 24, 300, 0.81, f"{_NV} L4; AWS g6.xlarge"),
        # A10G (AWS variant of A10, lower clocks): ~70 TFLOP/s bf16 dense, 24 GB at 600 GB/s;
        # g5.xlarge $1.006. NVIDIA publishes no A10G sheet; 70 is AWS's g5 figure per GPU.
        DeviceType("A10G", "nvidia", 70, 24, 600, 1.01, "AWS EC2 G5 product page; A10 datasheet for memory"),
        # A100 SXM: 312 TFLOP/s bf16 dense; 40 GB at 1555 GB/s, 80 GB at 2039 GB/s.
        DeviceType("A100-40G", "nvidia", 312, 40, 1555, 4.10, f"{_NV} A100; AWS p4d.24xlarge $32.77/8"),
        DeviceType("A100-80G", "nvidia", 312, 80, 2039, 5.12, f"{_NV} A100 80GB; AWS p4de.24xlarge $40.97/8"),
        # H100 SXM: 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3350 GB/s; p5.48xlarge $98.32/8.
        DeviceType("H100-80G", "nvidia", 989, 80, 3350, 12.29, f"{_NV} H100 SXM; AWS p5.48xlarge/8"),
        # H200 SXM: same compute as H100, 141 GB HBM3e at 4800 GB/s; p5e.48xlarge ~$115/8 (est.).
        DeviceType("H200", "nvidia", 989, 141, 4800, 14.39, f"{_NV} H200; AWS p5e list price/8 (est.)"),
        # GH200 (Grace Hopper, 96 GB HBM3 variant): 989 TFLOP/s, 4000 GB/s; Lambda ~$3.19 (est.).
        DeviceType("GH200", "nvidia", 989, 96, 4000, 3.19, f"{_NV} GH200 96GB; Lambda on-demand (est.)"),
        # GeForce (Ampere GA102 whitepaper, fp16 tensor with fp32 accumulate, dense).
        DeviceType("RTX-3080Ti", "nvidia", 68.2, 12, 912, 0.30, "NVIDIA Ampere GA102 whitepaper; community cloud (est.)"),
        DeviceType("RTX-3090", "nvidia", 71, 24, 936, 0.35, "NVIDIA Ampere GA102 whitepaper; community cloud (est.)"),
        # Ada AD102 whitepaper: 165.2 TFLOP/s fp16 tensor with fp32 accumulate, dense.
        DeviceType("RTX-4090", "nvidia", 165.2, 24, 1008, 0.69, "NVIDIA Ada whitepaper; community cloud (est.)"),
        # MI250 OAM (two GCDs): 362.1 TFLOP/s fp16/bf16 dense, 128 GB HBM2e at 3276.8 GB/s.
        # Frameworks show one OAM as two devices: use MI250-GCD for each of those.
        DeviceType("MI250", "amd", 362.1, 128, 3276.8, 4.00, "AMD Instinct MI250 datasheet; price est."),
        DeviceType("MI250-GCD", "amd", 181.05, 64, 1638.4, 2.00, "half of AMD MI250 OAM (one GCD)"),
        # MI300X: 1307.4 TFLOP/s fp16/bf16 dense, 192 GB HBM3 at 5300 GB/s.
        DeviceType("MI300X", "amd", 1307.4, 192, 5300, 6.00, "AMD Instinct MI300X datasheet; price est."),
        # L40S: 362 TFLOP/s fp16 tensor dense (fp32 accumulate), 48 GB at 864 GB/s.
        DeviceType("L40S", "nvidia", 362, 48, 864, 1.86, f"{_NV} L40S; AWS g6e.xlarge"),
        # A generic CPU socket, for CPU/gloo runs; measured profiles replace these guesses.
        DeviceType("CPU", "cpu", 1.0, 16, 50, 0.05, "placeholder for CPU ranks: profile to measure"),
    ]
}

LINK_TYPES: dict[str, LinkType] = {
    l.name: l
    for l in [
        # NVLink per-GPU aggregate per direction: links x 25 GB/s (x 20 for NVLink1).
        LinkType("NVLink1", 80, 3, "P100: 4 links x 20 GB/s (NVIDIA P100 whitepaper)"),
        LinkType("NVLink2", 150, 3, "V100: 6 links x 25 GB/s (NVIDIA V100 whitepaper)"),
        LinkType("NVLink3", 300, 3, "A100: 12 links x 25 GB/s (NVIDIA A100 whitepaper)"),
        LinkType("NVLink4", 450, 3, "H100: 18 links x 25 GB/s (NVIDIA H100 whitepaper)"),
        # PCIe x16, per direction after 128b/130b encoding (PCI-SIG specifications).
        LinkType("PCIe3", 15.75, 5, "PCIe 3.0 x16: 8 GT/s x 16 lanes (PCI-SIG)"),
        LinkType("PCIe4", 31.5, 5, "PCIe 4.0 x16: 16 GT/s x 16 lanes (PCI-SIG)"),
        LinkType("PCIe5", 63, 5, "PCIe 5.0 x16: 32 GT/s x 16 lanes (PCI-SIG)"),
        LinkType("InfinityFabric", 448, 3, "MI300X: 7 links x 64 GB/s (AMD MI300X datasheet)"),
        # InfiniBand 4x ports (InfiniBand Trade Association roadmap): EDR 100, HDR 200, NDR 400 Gb/s.
        LinkType("IB-EDR", 12.5, 5, "InfiniBand EDR 100 Gb/s (IBTA)"),
        LinkType("IB-HDR", 25, 5, "InfiniBand HDR 200 Gb/s (IBTA)"),
        LinkType("IB-NDR", 50, 5, "InfiniBand NDR 400 Gb/s (IBTA)"),
        # Ethernet (IEEE 802.3); latency is what TCP-based collectives typically see.
        LinkType("Eth-10G", 1.25, 30, "10 Gb Ethernet (IEEE 802.3ae)"),
        LinkType("Eth-25G", 3.125, 25, "25 Gb Ethernet (IEEE 802.3by)"),
        LinkType("Eth-100G", 12.5, 15, "100 Gb Ethernet (IEEE 802.3ba)"),
        # Shared memory between processes on one host (gloo on CPU); measured profiles replace it.
        LinkType("SharedMem", 5, 20, "loopback/shared memory between CPU processes (rough)"),
    ]
}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    if not close:
        close = difflib.get_close_matches(name.upper(), [c.upper() for c in choices], n=1, cutoff=0.4)
        close = [c for c in choices if c.upper() in close]
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(choices))}"


def suggest_device(name: str, extra: dict[str, DeviceType] | None = None) -> str:
    return _suggest(name, sorted({**DEVICE_TYPES, **(extra or {})}))


def suggest_link(name: str) -> str:
    return _suggest(name, sorted(LINK_TYPES))


def with_price(d: DeviceType, cost_per_hour_usd: float) -> DeviceType:
    return replace(d, cost_per_hour_usd=cost_per_hour_usd)
