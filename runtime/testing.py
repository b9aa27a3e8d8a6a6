"""Checking runs against the single-process reference: launching torchrun on this machine
(captured), reading a run's losses and checkpointed parameters, and error measures.
Used by the runtime tests and benchmarks' sanity checks."""

from __future__ import annotations

import glob
import json
import subprocess
from pathlib import Path

import torch

from .checkpoint import read_rank_file
from .launch import local_command, local_env


def torchrun(nproc: int, args: list[str], *, script: str | None = None, max_restarts: int = 0,
             cwd: Path | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = local_env(nproc)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(local_command(nproc, args, max_restarts=max_restarts, script=script), env=env,
                          cwd=cwd, text=True, capture_output=True, timeout=timeout_s)


def records(out_dir: Path, event: str | None = None) -> list[dict]:
    """metrics.jsonl: the step records, or (event=...) the event records of that kind
    ('straggler', 'decision')."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == event]


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in records(out_dir)]


def checkpoint_params(ckpt_dir: Path, step: int) -> list[dict[str, torch.Tensor]]:
    """Parameters of every rank at a checkpoint (one dict per rank)."""
    files = sorted(glob.glob(str(ckpt_dir / f"step_{step:07d}" / "rank_*.pt")))
    return [read_rank_file(Path(f))["params"] for f in files]


def checkpoint_optimizer(ckpt_dir: Path, step: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Optimizer state by parameter name of every rank at a checkpoint (one dict per rank)."""
    files = sorted(glob.glob(str(ckpt_dir / f"step_{step:07d}" / "rank_*.pt")))
    return [read_rank_file(Path(f))["optimizer"]["by_param"] for f in files]


SCALE_FLOOR = 1e-3


def max_relative_error(ranks: list[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Worst per-tensor max|p - ref| / max(max|ref|, 1e-3) over every copy of every
    parameter; also checks that the ranks together hold every parameter. The 1e-3 floor
    compares tensors that stay near zero absolutely (BERT's attention key bias: its
    gradient is mathematically zero, so it holds round-off only)."""
    held = {n for r in ranks for n in r}
    assert held == set(ref), f"parameters not held by any rank: {sorted(set(ref) - held)[:5]}"
    worst = (0.0, "")
    for r in ranks:
        for n, t in r.items():
            err = float((t.double() - ref[n].double()).abs().max() / ref[n].double().abs().max().clamp_min(SCALE_FLOOR))
            worst = max(worst, (err, n))
    return worst


def global_relative_error(ranks: list[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> float:
    """||p - ref|| / ||ref|| over the whole model (each rank's copies)."""
    num = den = 0.0
    for r in ranks:
        for n, t in r.items():
            num += float(((t.double() - ref[n].double()) ** 2).sum())
            den += float((ref[n].double() ** 2).sum())
    return (num / den) ** 0.5
