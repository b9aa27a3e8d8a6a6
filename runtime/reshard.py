"""Resharding checkpoints: resume under a plan other than the one that saved.

A rank file (format 3, runtime.checkpoint) holds everything under whole-model parameter
names, whole (runtime.stage_state: tensor-parallel and zero1 / parameter-server shards
are gathered before saving), so what it holds does not depend on how the plan cut the
model; the step directory also holds the plan that wrote it (``plan.json``).

Resuming under a new plan (other stage boundaries, shares, tensor-parallel widths,
optimizer sharding, world size), each new rank reads the old plan, picks the fewest old
ranks whose stages cover its layers (``source_ranks``: every copy of a parameter is the
same), reads their files with ``checkpoint.read_rank_file`` (tensors and plain values
only, never unpickled objects) and keeps the parameters and optimizer state of its own
parameter names. ``checkpoint.restore`` then puts them in through the rank's StageState,
which cuts the tensor-parallel and zero1 shards this plan needs; parameters and
optimizer state arrive bitwise as saved, and the data position (``next_sample``)
continues exactly. RNG states are restored only under the same plan (dropout masks
follow the layout anyway).

Never: pickle, or ``torch.load`` other than through ``checkpoint.read_rank_file``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetalloc.errors import SpecError
from hetalloc.plan import Plan, load_plan, plan_context

from .checkpoint_meta import PLAN_FILE, plan_key, rank_file, step_dir
from .rankmap import rank_map


def holders(plan: Plan) -> list[tuple[int, int, int]]:
    """(rank, start, stop) of every rank of a plan: the layers its stage holds."""
    cluster, _ = plan_context(plan)
    rm = rank_map(plan, cluster)
    where = plan.placement()
    out = []
    for r, d in enumerate(rm.devices):
        ri, si = where[d]
        s = plan.replicas[ri].stages[si]
        out.append((r, s.start, s.stop))
    return out


def source_ranks(old: Plan, start: int, stop: int) -> list[int]:
    """The fewest old ranks whose stages cover layers [start, stop): the largest overlap
    first, then the lowest rank (their files hold each parameter and its optimizer
    state whole, so any holder will do)."""
    hs = [h for h in holders(old) if h[1] < stop and start < h[2]]
    need = set(range(start, stop))
    out = []
    for r, a, b in sorted(hs, key=lambda h: (-(min(h[2], stop) - max(h[1], start)), h[0])):
        if need & set(range(a, b)):
            out.append(r)
            need -= set(range(a, b))
    if need:
        raise SpecError("checkpoint", "", f"no rank of the saved plan holds layers {sorted(need)}",
                        "the checkpoint belongs to another model")
    return sorted(out)


def loader(rank: int, key: str, world_size: int, start: int, stop: int,
           names: set[str]) -> Callable[[Path, int], tuple[dict[str, Any], Path]]:
    """A per-step loader for checkpoint.find_resume: this rank's state at a step, from
    its own file when the step was saved by this plan (or has no plan.json: then only
    that plan resumes), else put together from the old ranks' files (module doc).
    Raises checkpoint.Damaged (fall back to an older step) or SpecError (refuse), as
    checkpoint.read_rank_file does."""
    # runtime.checkpoint builds on runtime.stage_state; importing it here, when a run
    # resumes, keeps this module's file-picking usable without building a stage.
    from .checkpoint import Damaged, own_file, read_rank_file
    own = own_file(rank, world_size, key)

    def load(ckpt_dir: Path, step: int) -> tuple[dict[str, Any], Path]:
        plan_path = step_dir(ckpt_dir, step) / PLAN_FILE
        if not plan_path.exists():
            return own(ckpt_dir, step)
        try:
            old = load_plan(plan_path)
        except SpecError as e:
            raise Damaged(f"{plan_path} is damaged ({e.problem})") from None
        old_key = plan_key(old)
        if old_key == key and len(old.device_ids()) == world_size:
            return own(ckpt_dir, step)
        parts = []
        for r in source_ranks(old, start, stop):
            path = rank_file(ckpt_dir, step, r)
            st = read_rank_file(path)
            if st["step"] != step or st.get("format", 2) < 3 or st["plan_key"] != old_key:
                raise Damaged(f"{path} belongs to another run (step {st['step']}, format {st.get('format')})")
            parts.append(st)
        params: dict[str, torch.Tensor] = {}
        by_param: dict[str, dict[str, Any]] = {}
        for st in parts:
            saved = st["optimizer"].get("by_param", {})
            for n, t in st["params"].items():
                if n in names and n not in params:
                    params[n] = t
                    if n in saved:
                        by_param[n] = saved[n]
        missing = sorted(names - set(params))
        if missing:
            raise SpecError(str(step_dir(ckpt_dir, step)), "params", f"no rank file holds {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                            "the checkpoint belongs to another model")
        first = parts[0]
        state = {"format": first["format"], "step": step, "plan_key": key, "resharded_from": old_key,
                 "params": params, "optimizer": {"by_param": by_param, "hyper": first["optimizer"]["hyper"]},
                 "rng": None, "data": first.get("data", {"next_step": step + 1})}
        return state, step_dir(ckpt_dir, step)
    return load
