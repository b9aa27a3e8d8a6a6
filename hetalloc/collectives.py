"""Measured collectives: what ``hetalloc profile`` timed for each collective operation,
group size and link class, as a cluster file carries it (its ``collectives`` list).

An entry is one table: an operation (``hetalloc.costs.COLLECTIVE_OPS``), the scope it
was measured over (``intra``: devices of one node, over the node's intra link;
``inter``: one device per node, over the nodes' NICs), optionally the name of the link
it applies to (empty: any link of that scope), the group size, the message sizes and the
seconds taken (median of repeats; the slowest member of each repeat), and the per-hop
latency and bandwidth fitted to it (``hetalloc.calibrate.fit_collective``), which scale
it to group sizes that were not measured. How a table is read is one formula,
``hetalloc.costs.measured_collective_time``; which table serves a group of devices is
``hetalloc.evaluate.collective_time``.

Never: time anything here (the profiler measures; hetalloc.costs prices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .costs import COLLECTIVE_OPS, measured_collective_time
from .errors import SpecError

SCOPES = ("intra", "inter")
_KEYS = {"op", "scope", "link", "ranks", "bytes", "seconds", "latency_us", "bandwidth_gbps"}


@dataclass(frozen=True, slots=True)
class MeasuredCollective:
    op: str
    scope: str
    """intra (one node) | inter (one device per node)."""
    ranks: int
    bytes: tuple[float, ...]
    """Message sizes, ascending (the whole buffer each member passes)."""
    seconds: tuple[float, ...]
    """Measured seconds at each size, made non-decreasing in size (running maximum)."""
    latency_us: float
    """Fitted per-hop latency (scales the table to other group sizes)."""
    bandwidth_gbps: float
    """Fitted per-hop bandwidth, GB/s."""
    link: str = ""
    """Name of the link class it applies to; empty: every link of its scope."""

    def time(self, nbytes: float, n: int) -> float:
        return measured_collective_time(self.op, nbytes, n, self.ranks, list(self.bytes), list(self.seconds),
                                        self.bandwidth_gbps * 1e9, self.latency_us * 1e-6)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op, "scope": self.scope}
        if self.link:
            d["link"] = self.link
        d.update({"ranks": self.ranks, "bytes": [_num(b) for b in self.bytes],
                  "seconds": [_num(t) for t in self.seconds], "latency_us": _num(self.latency_us),
                  "bandwidth_gbps": _num(self.bandwidth_gbps)})
        return d


def _num(x: float) -> float | int:
    v = float(f"{x:.9g}")
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def pick(entries: tuple[MeasuredCollective, ...], op: str, scope: str, link: str,
         n: int) -> MeasuredCollective | None:
    """The table for `op` among n devices over a `scope` link named `link`: one measured
    at n if there is one, else the largest group below n, else the smallest above it; a
    table naming the link wins over one for any link."""
    cands = [e for e in entries if e.op == op and e.scope == scope and e.link in (link, "")]
    if not cands:
        return None
    named = [e for e in cands if e.link == link and link]
    cands = named or cands
    exact = [e for e in cands if e.ranks == n]
    if exact:
        return exact[0]
    below = [e for e in cands if e.ranks < n]
    if below:
        return max(below, key=lambda e: e.ranks)
    return min(cands, key=lambda e: e.ranks)


def parse_collectives(raw: Any, source: str) -> tuple[MeasuredCollective, ...]:
    """The cluster file's ``collectives`` list, checked field by field."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError(source, "collectives", "expected a list of measured collectives",
                        "write it with 'hetalloc profile', or leave it out for the analytic formulas")
    out = []
    for i, e in enumerate(raw):
        p = f"collectives[{i}]"
        if not isinstance(e, dict):
            raise SpecError(source, p, "expected a mapping", f"fields: {', '.join(sorted(_KEYS))}")
        for k in e:
            if k not in _KEYS:
                raise SpecError(source, f"{p}.{k}", f"unknown field '{k}'", f"allowed: {', '.join(sorted(_KEYS))}")
        op, scope = e.get("op"), e.get("scope")
        if op not in COLLECTIVE_OPS:
            raise SpecError(source, f"{p}.op", f"unknown collective {op!r}", f"use one of {', '.join(COLLECTIVE_OPS)}")
        if scope not in SCOPES:
            raise SpecError(source, f"{p}.scope", f"unknown scope {scope!r}", "use 'intra' (one node) or 'inter'")
        ranks = e.get("ranks")
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 2:
            raise SpecError(source, f"{p}.ranks", f"expected a group size >= 2, got {ranks!r}",
                            "give the number of devices the collective was measured among")
        sizes, times = e.get("bytes"), e.get("seconds")
        for key, vals in (("bytes", sizes), ("seconds", times)):
            if (not isinstance(vals, list) or len(vals) < 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in vals)):
                raise SpecError(source, f"{p}.{key}", "expected a list of at least 2 positive numbers",
                                "one entry per measured message size")
        if len(sizes) != len(times):
            raise SpecError(source, f"{p}.seconds", f"has {len(times)} entries for {len(sizes)} sizes",
                            "give one time per size")
        if any(b >= a for a, b in zip(sizes[1:], sizes)):
            raise SpecError(source, f"{p}.bytes", "sizes must ascend", "list message sizes from small to large")
        fig = {}
        for key in ("latency_us", "bandwidth_gbps"):
            v = e.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "bandwidth_gbps" and v <= 0):
                raise SpecError(source, f"{p}.{key}", f"expected a {'positive' if 'band' in key else 'non-negative'} "
                                f"number, got {v!r}", "re-run 'hetalloc profile'")
            fig[key] = float(v)
        link = e.get("link", "")
        if not isinstance(link, str):
            raise SpecError(source, f"{p}.link", f"expected a link name, got {link!r}", "or leave it out")
        mono, top = [], 0.0
        for t in times:
            top = max(top, float(t))
            mono.append(top)
        out.append(MeasuredCollective(op, scope, ranks, tuple(float(b) for b in sizes), tuple(mono),
                                      fig["latency_us"], fig["bandwidth_gbps"], link))
    return tuple(out)
