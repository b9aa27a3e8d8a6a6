"""What a checkpoint directory says about itself, readable without torch: its layout,
``latest.json``, and the plan key that ties a checkpoint to the plan that wrote it.

The launcher (runtime.launch) checks ``--resume`` with this before it starts any rank;
the ranks (runtime.checkpoint) use the same functions. Never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hetalloc.errors import SpecError
from hetalloc.plan import Plan

LATEST = "latest.json"

PLAN_FILE = "plan.json"
"""In a step directory: the plan that saved it (rank 0 writes it), so that another plan
can reshard from it (runtime.reshard)."""


def plan_key(plan: Plan) -> str:
    """Fingerprint of what decides the training computation and its sharding."""
    d = plan.to_dict()
    keep = {k: d[k] for k in ("model", "seq_len", "precision", "optimizer", "global_batch", "num_microbatches",
                              "schedule", "grad_sync", "replicas")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}"


def rank_file(ckpt_dir: str | Path, step: int, rank: int) -> Path:
    return step_dir(ckpt_dir, step) / f"rank_{rank:04d}.pt"


def saved_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps with a step directory (complete or not), newest first."""
    out = []
    for p in Path(ckpt_dir).glob("step_*"):
        num = p.name[len("step_"):]
        if p.is_dir() and num.isdigit():
            out.append(int(num))
    return sorted(out, reverse=True)


@dataclass(frozen=True, slots=True)
class Latest:
    """What ``latest.json`` says, or why it cannot be used."""

    step: int | None = None
    plan_key: str | None = None
    world_size: int | None = None
    problem: str | None = None
    """None when the file is absent or good; else a phrase ('is damaged (...)')."""


def read_latest(ckpt_dir: str | Path) -> Latest:
    p = Path(ckpt_dir) / LATEST
    if not p.exists():
        return Latest()
    try:
        d = json.loads(p.read_text())
        step, key, world = d["step"], d.get("plan_key"), d.get("world_size")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"step {step!r} is not a positive integer")
        if not (key is None or isinstance(key, str)) or not (world is None or isinstance(world, int)):
            raise ValueError("plan_key or world_size has the wrong type")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no {e} field"
        return Latest(problem=f"{p} is damaged ({why})")
    return Latest(step, key, world)


def latest_step(ckpt_dir: str | Path) -> int | None:
    """The step latest.json names (None if absent or damaged)."""
    return read_latest(ckpt_dir).step


def check_latest(latest: Latest, ckpt_dir: str | Path, key: str, world_size: int) -> None:
    """Refuse (SpecError) a checkpoint that latest.json says was written for another plan
    or by another number of ranks, unless its step directory holds the plan that saved it
    (PLAN_FILE): then the ranks reshard it (runtime.reshard)."""
    where = Path(ckpt_dir) / LATEST
    if latest.step is not None and (step_dir(ckpt_dir, latest.step) / PLAN_FILE).is_file():
        return
    if latest.plan_key is not None and latest.plan_key != key:
        raise SpecError(str(where), "plan_key", "the checkpoint was written for another plan",
                        "resume with the plan that wrote it, or start a new checkpoint directory")
    if latest.world_size is not None and latest.world_size != world_size:
        raise SpecError(str(where), "world_size", f"the checkpoint was written by {latest.world_size} ranks, "
                        f"this run has {world_size}", "resume with the plan that wrote it")
