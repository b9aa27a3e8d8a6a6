"""Resharding checkpoints: resume under a plan other than the one that saved.

A rank file (format 3, runtime.checkpoint) keeps everything under whole-model names, so
what it holds does not depend on how the plan cut the model:
- ``params``: {name: tensor}, each parameter this rank holds, whole;
- ``optimizer``: {"kind": "by_name", "hparams": {...}, "pieces": [...]}, the optimizer
  state as *pieces*: {"name", "offset", "numel", "state": {key: tensor}}, the state of
  elements [offset, offset + numel) of the flattened parameter ``name`` (a whole
  parameter is one piece at offset 0; a parameter-server shard, or a zero1 shard, covers
  parts of one or more parameters; scalars such as AdamW's ``step`` are kept per piece).
- each step directory also holds the plan that wrote it (``plan.json``).

Resuming under a new plan, each new rank reads the old plan, picks the old ranks whose
stages overlap its layers (``source_ranks``: one holder per layer when the old state was
whole, every holder when it was sharded), reads their files with
``checkpoint.read_rank_file`` (tensors and plain values only, never unpickled objects),
and puts together exactly what it needs: its parameters, and for each tensor its
optimizer steps (``GradSync.optimizer_layout``: which elements of which parameters it
covers) the state of those elements (``load_optimizer``: every element must be covered,
else the checkpoint is incomplete). Parameters and optimizer state arrive bitwise as
saved; the data position (``next_sample``) continues exactly. RNG states are restored
only under the same plan (dropout masks follow the layout anyway).

Tensor-parallel slices (once the runtime has them) fit the same scheme: a rank saves its
slice of a parameter as pieces of the whole (a column slice is a run of flat ranges), and
the loader cuts what the new degree needs.

Never: pickle, or ``torch.load`` other than through ``checkpoint.read_rank_file``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetalloc.errors import SpecError
from hetalloc.plan import Plan, load_plan, plan_context

from .rankmap import rank_map

Layout = list[list[tuple[str, int, int, int]]]
"""Per optimizer tensor (in the optimizer's order): (parameter name, offset in the
flattened parameter, elements, offset in the tensor) of every run of elements it holds."""

PLAN_FILE = "plan.json"


def whole_layout(named: list[tuple[str, torch.Tensor]]) -> Layout:
    """One optimizer tensor per parameter, each whole (no sharding)."""
    return [[(name, 0, p.numel(), 0)] for name, p in named]


def portable_optimizer(optimizer: torch.optim.Optimizer, layout: Layout) -> dict[str, Any]:
    """The optimizer's state under whole-model names (module doc)."""
    sd = optimizer.state_dict()
    if len(sd["param_groups"]) != 1:
        raise ValueError("one parameter group expected")
    hparams = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    if len(layout) != len(sd["param_groups"][0]["params"]):
        raise ValueError(f"layout has {len(layout)} tensors, the optimizer {len(sd['param_groups'][0]['params'])}")
    pieces = []
    for idx, runs in enumerate(layout):
        st = sd["state"].get(idx, {})
        for name, offset, numel, at in runs:
            state: dict[str, Any] = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    state[k] = v.detach().reshape(-1)[at:at + numel].clone()
                elif torch.is_tensor(v):
                    state[k] = v.detach().clone()
                elif v is not None:
                    state[k] = v
            pieces.append({"name": name, "offset": offset, "numel": numel, "state": state})
    return {"kind": "by_name", "hparams": hparams, "pieces": pieces}


def _merged(pieces: list[dict[str, Any]], name: str, numel: int, source: str
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """The flat state of one parameter from every piece of it: (vector states, scalar
    states, coverage mask)."""
    vectors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    covered = torch.zeros(numel, dtype=torch.bool)
    for pc in pieces:
        a, n = int(pc["offset"]), int(pc["numel"])
        if a < 0 or a + n > numel:
            raise SpecError(source, f"optimizer.pieces[{name}]", f"elements [{a}, {a + n}) outside the parameter's "
                            f"{numel}", "the checkpoint belongs to another model")
        for k, v in pc["state"].items():
            if torch.is_tensor(v) and v.dim() > 0:
                if k not in vectors:
                    vectors[k] = torch.empty(numel, dtype=v.dtype)
                vectors[k][a:a + n] = v
            else:
                scalars.setdefault(k, v)
        covered[a:a + n] = True
    return vectors, scalars, covered


def load_optimizer(optimizer: torch.optim.Optimizer, layout: Layout, saved: dict[str, Any], source: str) -> None:
    """Put the by-name state `saved` (pieces from one or several rank files) into this
    rank's optimizer, whose tensors hold the runs `layout` says."""
    tensors = optimizer.param_groups[0]["params"]
    if len(tensors) != len(layout):
        raise ValueError(f"layout has {len(layout)} tensors, the optimizer {len(tensors)}")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pc in saved["pieces"]:
        by_name.setdefault(pc["name"], []).append(pc)
    numel_of: dict[str, int] = {}
    for runs in layout:
        for name, offset, numel, _ in runs:
            numel_of[name] = max(numel_of.get(name, 0), offset + numel)
    merged = {}
    for name in numel_of:
        total = max([numel_of[name]] + [int(p["offset"]) + int(p["numel"]) for p in by_name.get(name, [])])
        merged[name] = _merged(by_name.get(name, []), name, total, source)
    state: dict[int, dict[str, Any]] = {}
    for idx, runs in enumerate(layout):
        t = tensors[idx]
        keys = None
        for name, offset, numel, _ in runs:
            vectors, _, covered = merged[name]
            if not bool(covered[offset:offset + numel].all()):
                raise SpecError(source, "optimizer", f"no saved optimizer state for elements [{offset}, "
                                f"{offset + numel}) of {name}", "the checkpoint is incomplete: resume from another")
            keys = set(vectors) if keys is None else keys & set(vectors)
        entry: dict[str, Any] = {}
        for k in sorted(keys or ()):
            parts = [merged[name][0][k][offset:offset + numel] for name, offset, numel, _ in runs]
            entry[k] = torch.cat(parts).view(t.shape) if len(parts) > 1 else parts[0].view(t.shape).clone()
        first = runs[0][0]
        entry.update(merged[first][1])
        if entry:
            state[idx] = entry
    current = optimizer.state_dict()["param_groups"][0]
    group = {**current, **saved.get("hparams", {}), "params": current["params"]}
    optimizer.load_state_dict({"state": state, "param_groups": [group]})


# ---- which old files a new rank needs -------------------------------------------------

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
    """Old ranks whose files a new rank holding layers [start, stop) reads: with whole
    optimizer state, the fewest holders that cover those layers (every copy is the same);
    with sharded state (parameter server, zero1), every holder of an overlapping layer."""
    hs = [h for h in holders(old) if h[1] < stop and start < h[2]]
    if old.grad_sync == "param_server" or old.optimizer_sharding != "none":
        return sorted(r for r, _, _ in hs)
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
    its own file when the step was saved by this plan (or before resharding existed, when
    only that plan resumes), else put together from the old ranks' files (module doc).
    Raises checkpoint.Damaged (fall back to an older step) or SpecError (refuse), as
    checkpoint.read_rank_file does."""
    # runtime.checkpoint imports this module's file format at its top; the loader needs
    # its reader in turn, so it is imported here, when a run resumes.
    from .checkpoint import Damaged, own_file, plan_key, rank_file, read_rank_file, step_dir
    own = own_file(rank, world_size, key)

    def load(ckpt_dir: Path, step: int) -> tuple[dict[str, Any], Path]:
        plan_path = step_dir(ckpt_dir, step) / PLAN_FILE
        if not plan_path.exists():
            return own(ckpt_dir, step)
        try:
            old = load_plan(plan_path)
        except SpecError as e:
            raise Damaged(f"{plan_path} is damaged ({e.problem})") from None
        if plan_key(old) == key and len(old.device_ids()) == world_size:
            return own(ckpt_dir, step)
        parts = []
        for r in source_ranks(old, start, stop):
            path = rank_file(ckpt_dir, step, r)
            st = read_rank_file(path)
            if st["step"] != step or st.get("format", 2) < 3 or st["plan_key"] != plan_key(old):
                raise Damaged(f"{path} belongs to another run (step {st['step']}, format {st.get('format')})")
            parts.append(st)
        params: dict[str, torch.Tensor] = {}
        pieces: list[dict[str, Any]] = []
        for st in parts:
            for n, t in st["params"].items():
                if n in names:
                    params.setdefault(n, t)
            pieces += [pc for pc in st["optimizer"]["pieces"] if pc["name"] in names]
        missing = sorted(names - set(params))
        if missing:
            raise SpecError(str(step_dir(ckpt_dir, step)), "params", f"no rank file holds {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                            "the checkpoint belongs to another model")
        first = parts[0]
        state = {"format": 3, "step": step, "plan_key": key, "resharded_from": first["plan_key"],
                 "params": params, "optimizer": {"kind": "by_name", "hparams": first["optimizer"]["hparams"],
                                                 "pieces": pieces},
                 "rng": None, "data": first.get("data", {"next_step": step + 1})}
        return state, step_dir(ckpt_dir, step)
    return load
