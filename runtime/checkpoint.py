"""Checkpoints: per-rank state written atomically, and a ``latest.json`` that names the
last checkpoint every rank finished.

Layout: ``<dir>/step_0000005/rank_0003.pt`` holds one rank's parameters (by whole-model
name), optimizer state, RNG states and data position; ``<dir>/latest.json`` is written
by rank 0 only after all ranks have written theirs (a barrier), so a run killed while
saving resumes from the previous complete checkpoint. Files appear by rename
(``hetalloc.fileio``), never half-written. A checkpoint records the plan's key; resuming
with another plan is refused (re-sharding is not implemented).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_bytes, atomic_write_json
from hetalloc.plan import Plan

from .models import StageModule

KEEP_LAST = 2
"""Complete checkpoints kept; older ones are deleted after a new one is complete."""


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


def latest_step(ckpt_dir: str | Path) -> int | None:
    p = Path(ckpt_dir) / "latest.json"
    if not p.exists():
        return None
    return int(json.loads(p.read_text())["step"])


def _rng_state(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(ckpt_dir: str | Path, step: int, rank: int, key: str, module: StageModule,
         optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every rank calls this at the same step (it contains a barrier)."""
    state = {
        "step": step, "rank": rank, "plan_key": key,
        "params": {name: p.detach().cpu().clone() for name, p in module.named_model_parameters()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(device),
        "data": {"next_step": step + 1},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(rank_file(ckpt_dir, step, rank), buf.getvalue())
    dist.barrier()
    if rank == 0:
        atomic_write_json(Path(ckpt_dir) / "latest.json",
                          {"step": step, "plan_key": key, "world_size": dist.get_world_size()})
        done = sorted(Path(ckpt_dir).glob("step_*"))
        for old in done[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)


def load(ckpt_dir: str | Path, step: int, rank: int, key: str, module: StageModule,
         optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Restore this rank's state from checkpoint `step`; returns the step it completed."""
    path = rank_file(ckpt_dir, step, rank)
    if not path.exists():
        raise SpecError(str(path), "", "missing", "the checkpoint was made with another world size; "
                        "resume with the plan that wrote it")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["plan_key"] != key:
        raise SpecError(str(path), "plan_key", "the checkpoint was written for another plan",
                        "resume with the plan that wrote it, or start a new checkpoint directory")
    params = dict(module.named_model_parameters())
    if set(params) != set(state["params"]):
        raise SpecError(str(path), "params", "the checkpoint holds other layers than this rank's stage",
                        "resume with the plan that wrote it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])  # in place: parameters are views into gradient buckets
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], device)
    return int(state["step"])
