"""Checkpoints: per-rank state written atomically, and a ``latest.json`` that names the
last checkpoint every rank finished.

Layout: ``<dir>/step_0000005/rank_0003.pt`` holds one rank's parameters and optimizer
state by whole-model parameter name, whole (``runtime.stage_state``: tensor-parallel and
zero1 shards gathered, so the files do not depend on how the plan sharded them), RNG
states and data position (the first sample of the next step); rank 0 also writes the
plan that saved into the step directory (``plan.json``); ``<dir>/latest.json`` is written
by rank 0 only after all ranks have written theirs (a barrier), so a run killed while
saving resumes from the previous complete checkpoint. Files appear by rename
(``hetalloc.fileio``), never half-written; temporaries of a killed writer are deleted at
the next save, with the step directories of an abandoned timeline (past the step saved).

Resuming picks the newest checkpoint that every rank can read (``find_resume``): the one
``latest.json`` names, or, when that file or a rank's file is damaged or missing, the
newest complete one before it, with a one-line warning. A checkpoint records the plan's
key and world size; a run under another plan (other stage boundaries, shares,
tensor-parallel widths, optimizer sharding, world size) puts its state together from the
old ranks' files (``runtime.reshard``, given as find_resume's loader); a checkpoint
without its plan.json resumes only under the plan that wrote it.

A rank file holds tensors and plain values only (dicts, lists, numbers, strings) and is
read with ``torch.load(weights_only=True)``: a file that holds anything else (a pickled
object whose loading would run code) is refused, never executed. Never ``pickle`` or
``weights_only=False`` on a file.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_bytes, atomic_write_json, remove_temporaries

from hetalloc.plan import Plan

from .checkpoint_meta import (LATEST, PLAN_FILE, Latest, check_latest, latest_step, plan_key,  # noqa: F401
                              rank_file, read_latest, saved_steps, step_dir)
from .stage_state import StageState

KEEP_LAST = 2
"""Complete checkpoints kept; older ones are deleted after a new one is complete."""

FORMAT = 3
"""Rank file format: 2 holds tensors and plain values only (Python's RNG state as lists);
3 holds the optimizer state by parameter name, whole (``runtime.stage_state``)."""

# ---- one rank's file -------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {"torch": torch.get_rng_state(),
                           "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    else:  # format 1: the tuple itself (plain values too)
        random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_state(step: int, rank: int, world_size: int, key: str, stage: StageState,
               device: torch.device, *, next_sample: int | None = None) -> dict[str, Any]:
    """What one rank saves: tensors and plain values only (every rank calls this: it
    gathers tensor-parallel and zero1 shards). next_sample: the first training sample of
    the next step (the data position; default: step x global batch, fixed shares)."""
    data: dict[str, int] = {"next_step": step + 1}
    if next_sample is not None:
        data["next_sample"] = next_sample
    return {
        "format": FORMAT, "step": step, "rank": rank, "world_size": world_size, "plan_key": key,
        "params": stage.params(),
        "optimizer": stage.optimizer_state(),
        "rng": _rng_state(device),
        "data": data,
    }


class Damaged(Exception):
    """A rank file that cannot be read (truncated, empty, not a checkpoint): fall back."""


def read_rank_file(path: Path) -> dict[str, Any]:
    """Load one rank file without running code. Raises Damaged for a file that is missing
    or cannot be read, SpecError for one that holds other objects than tensors and plain
    values (it could run code when unpickled: refused, not executed)."""
    if not path.exists():
        raise Damaged(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something else
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors and plain values"
        raise SpecError(str(path), "", f"refused: it holds {what}, which a checkpoint never does, and loading it "
                        "could run code", "delete the file, or resume from a checkpoint directory you trust") from None
    except Exception as e:  # noqa: BLE001  (zip reader, EOF, OS errors: a damaged file)
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else "empty or truncated"
        raise Damaged(f"{path} is damaged ({type(e).__name__}: {first})") from None
    need = {"step": int, "plan_key": str, "params": dict, "optimizer": dict, "rng": dict}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in need.items()):
        raise Damaged(f"{path} is not a hetalloc checkpoint (fields {', '.join(need)} expected)")
    return state


def restore(state: dict[str, Any], path: Path, key: str, stage: StageState, device: torch.device) -> int:
    """Put a rank's state (its own file, or one put together by runtime.reshard, which
    has no RNG state: dropout masks follow the layout anyway) into this rank's module,
    optimizer and RNGs; returns its step."""
    if state["plan_key"] != key:
        raise SpecError(str(path), "plan_key", "the checkpoint was written for another plan",
                        "resume with the plan that wrote it, or start a new checkpoint directory")
    if stage.names() != set(state["params"]):
        raise SpecError(str(path), "params", "the checkpoint holds other layers than this rank's stage",
                        "resume with the plan that wrote it")
    stage.load_params(state["params"])  # in place: parameters are views into gradient buckets
    stage.load_optimizer_state(state["optimizer"])
    if state.get("rng") is not None:
        _set_rng_state(state["rng"], device)
    return int(state["step"])


# ---- all ranks together ------------------------------------------------------------------

def save(ckpt_dir: str | Path, step: int, rank: int, key: str, stage: StageState, device: torch.device, *,
         plan: Plan | None = None, next_sample: int | None = None) -> None:
    """Every rank calls this at the same step (it contains a barrier). With `plan`, rank 0
    also writes it into the step directory, so that other plans can reshard from it."""
    world = dist.get_world_size()
    buf = io.BytesIO()
    torch.save(rank_state(step, rank, world, key, stage, device, next_sample=next_sample), buf)
    path = rank_file(ckpt_dir, step, rank)
    if path.parent.is_dir():
        remove_temporaries(path.parent, path.name)  # this rank's, left by a killed attempt
    atomic_write_bytes(path, buf.getvalue())
    if rank == 0 and plan is not None:
        atomic_write_json(path.parent / PLAN_FILE, plan.to_dict())
    dist.barrier()
    if rank == 0:
        atomic_write_json(Path(ckpt_dir) / LATEST, {"step": step, "plan_key": key, "world_size": world})
        prune(ckpt_dir, step)


def prune(ckpt_dir: str | Path, step: int) -> None:
    """After checkpoint `step` is complete: keep it and the KEEP_LAST - 1 before it; delete
    older ones, newer ones (left by an attempt that went further before a resume from an
    earlier step: another timeline) and every temporary a killed writer left. Only while
    no rank writes (rank 0, after the barrier)."""
    steps = saved_steps(ckpt_dir)
    keep = [s for s in steps if s <= step][:KEEP_LAST]
    for s in steps:
        if s not in keep:
            shutil.rmtree(step_dir(ckpt_dir, s), ignore_errors=True)
    remove_temporaries(ckpt_dir)
    for s in keep:
        remove_temporaries(step_dir(ckpt_dir, s))


Gather = Callable[[Any], list[Any]]


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (small Python values between this job's ranks, never a file)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(slots=True)
class Resume:
    step: int
    """The checkpoint every rank resumes from; 0: none, start at step 1."""
    state: dict[str, Any] | None
    """This rank's state at that step (from read_rank_file)."""
    path: Path | None
    warning: str | None
    """One line for the user when damage decided the step (a file damaged or missing)."""


Load = Callable[[Path, int], tuple[dict[str, Any], Path]]
"""(checkpoint directory, step) -> this rank's state at that step and the file it names;
raises Damaged (fall back to an older step) or SpecError (refuse)."""


def own_file(rank: int, world_size: int, key: str) -> Load:
    """The loader of a run under the plan that saved: this rank's own file, which must
    be of this plan (else refused) and of this world size and step (else damaged)."""
    def load(ckpt_dir: Path, step: int) -> tuple[dict[str, Any], Path]:
        path = rank_file(ckpt_dir, step, rank)
        state = read_rank_file(path)
        if state["plan_key"] != key:
            raise SpecError(str(path), "plan_key", "the checkpoint was written for another plan",
                            "resume with the plan that wrote it, or start a new checkpoint directory")
        if state.get("world_size", world_size) != world_size or state["step"] != step:
            raise Damaged(f"{path} belongs to another run (step {state['step']}, {state.get('world_size')} ranks)")
        return state, path
    return load


def find_resume(ckpt_dir: str | Path, rank: int, world_size: int, key: str,
                gather: Gather = _all_gather, load: Load | None = None) -> Resume:
    """The newest checkpoint that every rank can read, agreed by all ranks (every rank
    calls this; `gather` exchanges small values between them). Rank 0's ``latest.json``
    decides the first choice (so node-local checkpoint directories work too); a damaged
    or missing file makes everyone fall back to the newest complete checkpoint before it,
    with a warning. Without latest.json and without a complete checkpoint (a run killed
    while writing its first), training starts at step 1. Raises SpecError, the same on
    every rank, for a checkpoint of another plan or world size, a refused file, or a
    latest.json whose checkpoints are all damaged. With `load` (runtime.reshard.loader),
    checkpoints of other plans and world sizes are read through it instead of refused."""
    ckpt_dir = Path(ckpt_dir)
    views = gather((read_latest(ckpt_dir), saved_steps(ckpt_dir)))
    latest: Latest = views[0][0]
    where = ckpt_dir / LATEST
    if load is None:
        check_latest(latest, ckpt_dir, key, world_size)
        load = own_file(rank, world_size, key)
    known = sorted({s for _, steps in views for s in steps}, reverse=True)
    if latest.step is not None:
        candidates = [latest.step] + [s for s in known if s < latest.step]
    else:
        candidates = known
    problems = [latest.problem] if latest.problem else []
    if latest.step is None and latest.problem is None and candidates:
        problems.append(f"{where} is missing")
    for step in candidates:
        path = rank_file(ckpt_dir, step, rank)
        state: dict[str, Any] | None = None
        outcome: tuple[str, Any] = ("ok", None)
        try:
            state, path = load(ckpt_dir, step)
        except Damaged as e:
            outcome = ("damaged", str(e))
        except SpecError as e:
            outcome = ("refuse", (e.source, e.path, e.problem, e.fix))
        outcomes = gather(outcome)
        refused = [detail for kind, detail in outcomes if kind == "refuse"]
        if refused:
            raise SpecError(*refused[0])
        damaged = [detail for kind, detail in outcomes if kind == "damaged"]
        if not damaged:
            warning = None
            if problems:
                warning = f"{'; '.join(problems)}; resuming from step {step}, the newest complete checkpoint"
            return Resume(step, state, path, warning)
        if step == latest.step and not any(step in steps for _, steps in views):
            problems.append(f"{where} names step {step}, but {step_dir(ckpt_dir, step)} is missing")
        else:
            more = f" (and {len(damaged) - 1} more rank files)" if len(damaged) > 1 else ""
            problems.append(f"checkpoint step {step} is incomplete: {damaged[0]}{more}")
    if latest.step is not None or latest.problem is not None:
        raise SpecError(str(ckpt_dir), "", f"{'; '.join(problems)}; no complete checkpoint is left",
                        "restore the damaged files, or start a new checkpoint directory to train from step 1")
    warning = f"{'; '.join(problems)}; no complete checkpoint, starting at step 1" if problems else None
    return Resume(0, None, None, warning)
