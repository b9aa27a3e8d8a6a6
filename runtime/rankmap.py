"""Rank <-> device mapping: the one place that decides which process serves which device.

The rule (documented in the user guide; everything else in the runtime asks this module):
- the ranks are the devices the plan uses, in cluster order (``cluster.devices``, which
  lists nodes in spec order and each node's devices by local index), so a node's ranks
  are consecutive;
- the node rank of a node is its position among the nodes the plan uses;
- on a node, local rank k serves the k-th device of that node that the plan uses.

``check_launch`` compares what torchrun says (WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK) with the plan and raises a one-line ``SpecError`` before any
training starts. This module never imports torch, so the CLI can use it to print commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from hetalloc.cluster import Cluster
from hetalloc.errors import SpecError
from hetalloc.plan import Plan, mixed_tp_segments


@dataclass(frozen=True, slots=True)
class RankMap:
    devices: tuple[str, ...]
    """devices[rank] = device id served by that rank."""
    device_nodes: tuple[str, ...]
    """device_nodes[rank] = node of that rank's device."""
    nodes: tuple[str, ...]
    """Nodes the plan uses, in node-rank order."""

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def rank_of(self, device: str) -> int:
        return self.devices.index(device)

    def node_rank(self, node: str) -> int:
        return self.nodes.index(node)

    def ranks_on(self, node: str) -> list[int]:
        return [r for r, n in enumerate(self.device_nodes) if n == node]

    def local_rank(self, rank: int) -> int:
        return self.ranks_on(self.device_nodes[rank]).index(rank)


def check_supported(plan: Plan, source: str = "plan") -> None:
    """Refuse, before anything starts, what the runtime does not run: layers held by
    tensor-parallel groups of different sizes under zero1 or the parameter server (their
    optimizer steps flat shards of the gradient buckets, which such layers only have as
    copies; the prediction and the simulator do handle them)."""
    if plan.optimizer_sharding == "none" and plan.grad_sync != "param_server":
        return
    for a, b, sizes in mixed_tp_segments(plan)[:1]:
        what = "zero1" if plan.optimizer_sharding != "none" else "the parameter server"
        raise SpecError(source, "replicas", f"layers {a}-{b - 1} are held by tensor-parallel groups of sizes "
                            f"{', '.join(map(str, sizes))}: the runtime shards their optimizer state ({what}) "
                            "only between groups of one size",
                            "give the groups that hold the same layers one size, or use ring or hierarchical "
                            "gradient sync without optimizer sharding")


def rank_map(plan: Plan, cluster: Cluster) -> RankMap:
    used = set(plan.device_ids())
    devs = [d for d in cluster.devices if d.id in used]
    nodes: list[str] = []
    for d in devs:
        if d.node not in nodes:
            nodes.append(d.node)
    return RankMap(tuple(d.id for d in devs), tuple(d.node for d in devs), tuple(nodes))


@dataclass(frozen=True, slots=True)
class LaunchInfo:
    """Who this process is, checked against the plan."""

    rank: int
    local_rank: int
    world_size: int
    device: str
    node: str


def _env_int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in env:
        if default is not None:
            return default
        raise SpecError("environment", key, "not set",
                        "start the runtime with torchrun (or 'hetalloc run plan.json')")
    try:
        return int(env[key])
    except ValueError:
        raise SpecError("environment", key, f"expected an integer, got {env[key]!r}", "check the launcher") from None


def check_launch(rm: RankMap, env: Mapping[str, str], node: str | None = None) -> LaunchInfo:
    """Validate torchrun's view of this process against the plan (module doc gives the rule).

    node: the plan node this torchrun was started for (``--plan-node``); when given, a launch on
    the wrong node fails even if the process counts happen to agree.
    """
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    group_rank = _env_int(env, "GROUP_RANK", 0)
    if world != rm.world_size:
        per_node = ", ".join(f"{n}: {len(rm.ranks_on(n))}" for n in rm.nodes)
        fix = (f"launch with --nproc-per-node={rm.world_size}" if len(rm.nodes) == 1
               else f"launch {len(rm.nodes)} nodes with these process counts ({per_node})")
        raise SpecError("torchrun", "WORLD_SIZE", f"is {world} but the plan uses {rm.world_size} devices", fix)
    if node is not None and node not in rm.nodes:
        raise SpecError("--plan-node", "", f"'{node}' is not a node this plan uses", f"use one of {', '.join(rm.nodes)}")
    if group_rank >= len(rm.nodes):
        raise SpecError("torchrun", "GROUP_RANK", f"is {group_rank} but the plan uses {len(rm.nodes)} nodes",
                        f"use --node-rank between 0 and {len(rm.nodes) - 1}")
    plan_node = rm.nodes[group_rank]
    if node is not None and node != plan_node:
        raise SpecError("torchrun", "--node-rank", f"node rank {group_rank} is plan node '{plan_node}', "
                        f"but this is node '{node}'", f"start node '{node}' with --node-rank={rm.node_rank(node)}")
    ranks = rm.ranks_on(plan_node)
    if local_world != len(ranks):
        raise SpecError("torchrun", "--nproc-per-node", f"node '{plan_node}' runs {local_world} processes but the "
                        f"plan uses {len(ranks)} of its devices", f"use --nproc-per-node={len(ranks)} on this node")
    if not 0 <= local_rank < len(ranks) or ranks[local_rank] != rank:
        raise SpecError("torchrun", "RANK", f"global rank {rank} (local {local_rank}) on node '{plan_node}' "
                        f"does not match the plan's ranks {ranks}",
                        "start the nodes in the plan's node order ('hetalloc run --nodes-print' shows it)")
    return LaunchInfo(rank, local_rank, world, rm.devices[rank], plan_node)
