"""Cluster specs of any size, built in code (no giant file in the repository).

``big_cluster_spec(nodes, gpus_per_node, mix)`` returns the dict a cluster YAML would
hold: `nodes` nodes of `gpus_per_node` GPUs each, in blocks of one device type per
``mix`` entry (node counts in proportion to its weights), every block on its own NIC
class. ``expanded=True`` writes one entry per node (the file a script that lists every
machine would produce) instead of one entry per block with a ``count``.

    python benchmarks/big_cluster.py --nodes 12500 --gpus 8 -o /tmp/100k.yaml

Must never: be imported by the packages (it serves benchmarks and tests only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

# (device type, intra link, NIC): one block of nodes each
MIXES = {
    "uniform": [("A100-80G", "NVLink3", "IB-HDR", 1.0)],
    "mixed": [("H100-80G", "NVLink4", "IB-NDR", 0.25), ("A100-80G", "NVLink3", "IB-HDR", 0.35),
              ("A100-40G", "NVLink3", "IB-HDR", 0.2), ("V100-32G", "NVLink2", "IB-EDR", 0.2)],
}


def big_cluster_spec(nodes: int, gpus_per_node: int = 8, mix: str = "uniform", *, expanded: bool = False) -> dict:
    """A cluster spec (dict) of `nodes` x `gpus_per_node` GPUs (see the module doc)."""
    blocks = MIXES[mix]
    total = sum(w for *_, w in blocks)
    counts = [int(nodes * w / total) for *_, w in blocks]
    counts[0] += nodes - sum(counts)
    out = []
    for (typ, intra, nic, _), c in zip(blocks, counts):
        base = typ.lower().replace("-", "")
        entry = {"gpus": [{"type": typ, "count": gpus_per_node}], "intra_link": intra, "nic": nic}
        if expanded:
            out.extend({"name": f"{base}-{k}", **entry} for k in range(c))
        elif c:
            out.append({"name": base, "count": c, **entry})
    return {"name": f"{mix}-{nodes * gpus_per_node}", "nodes": out}


def write_cluster(path: str | Path, nodes: int, gpus_per_node: int = 8, mix: str = "uniform", *,
                  expanded: bool = False) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(big_cluster_spec(nodes, gpus_per_node, mix, expanded=expanded),
                                   sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=12500)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--mix", default="uniform", choices=sorted(MIXES))
    ap.add_argument("--expanded", action="store_true", help="one entry per node")
    ap.add_argument("-o", "--out", required=True, help="YAML file to write")
    args = ap.parse_args()
    print(write_cluster(args.out, args.nodes, args.gpus, args.mix, expanded=args.expanded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
