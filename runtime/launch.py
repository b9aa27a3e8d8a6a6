"""Launching the runtime: torchrun commands for a plan, and a local run from Python.

A plan decides the launch (runtime.rankmap): one torchrun per node the plan uses, with
``--nproc-per-node`` = the node's devices in the plan and ``--node-rank`` = the node's
position. ``run_local`` starts a single-node plan here and returns the run's summary
(measured next to predicted); multi-node plans get one printed command per node.
Never imports torch (the launched processes do).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetalloc.errors import HetallocError, SpecError
from hetalloc.plan import Plan, load_plan, plan_context, validate_plan

from .rankmap import RankMap, check_supported, rank_map

ENTRY = "runtime.train"
DEFAULT_PORT = 29500


class RunFailed(HetallocError):
    """The launched training exited with an error."""


LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Set for every launch. Under plain torchrun's c10d rendezvous it gives a fresh store
per restart, so ranks restarted by --max-restarts never read the previous attempt's
addresses (pytorch/pytorch#135712); runtime.torchrun's rendezvous shares its one store
instead, and runtime.train prefixes each attempt's keys."""


@dataclass(frozen=True, slots=True)
class NodeCommand:
    node: str
    node_rank: int
    nproc: int
    argv: list[str]

    def shell(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in LAUNCH_ENV.items()), *(shlex.quote(a) for a in self.argv)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(nproc: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ranks on this machine: gloo on loopback, threads split over ranks."""
    env = dict(os.environ if base is None else base)
    for k, v in LAUNCH_ENV.items():
        env.setdefault(k, v)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def train_args(plan_path: str | Path, *, steps: int | None = None, slowdown: list[str] | None = None,
               out_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
               checkpoint_every: int = 0, resume: bool = False, extra: list[str] | None = None) -> list[str]:
    """Arguments of ``runtime.train`` (after ``-m runtime.train``)."""
    args = ["--plan", str(plan_path)]
    if steps is not None:
        args += ["--steps", str(steps)]
    for s in slowdown or []:
        args += ["--slowdown", s]
    if out_dir is not None:
        args += ["--out", str(out_dir)]
    if checkpoint_dir is not None:
        args += ["--checkpoint-dir", str(checkpoint_dir)]
    if checkpoint_every:
        args += ["--checkpoint-every", str(checkpoint_every)]
    if resume:
        args.append("--resume")
    return args + list(extra or [])


def node_commands(rm: RankMap, args: list[str], *, master_addr: str = "<address of node 0>",
                  master_port: int = DEFAULT_PORT, max_restarts: int = 0,
                  python: str = "python") -> list[NodeCommand]:
    """One torchrun command per node the plan uses (node rank order), as
    ``python -m runtime.torchrun``: node 0's store listens on master_addr only."""
    out = []
    for k, node in enumerate(rm.nodes):
        nproc = len(rm.ranks_on(node))
        argv = [python, "-m", TORCHRUN, f"--nnodes={len(rm.nodes)}", f"--node-rank={k}", f"--nproc-per-node={nproc}",
                f"--master-addr={master_addr}", f"--master-port={master_port}"]
        if max_restarts:
            argv.append(f"--max-restarts={max_restarts}")
        out.append(NodeCommand(node, k, nproc, argv + ["-m", ENTRY, *args, "--plan-node", node]))
    return out


TORCHRUN = "runtime.torchrun"
"""torchrun with the same flags, whose rendezvous store listens on 127.0.0.1 for a
standalone run and on --master-addr for a multi-node one (runtime.torchrun)."""


def local_command(nproc: int, args: list[str], *, max_restarts: int = 0, script: str | None = None) -> list[str]:
    """torchrun (as ``python -m runtime.torchrun --standalone``) for all ranks on this
    machine: every socket of the run listens on 127.0.0.1 only."""
    argv = [sys.executable, "-m", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        argv.append(f"--max-restarts={max_restarts}")
    return argv + ([script] if script else ["-m", ENTRY]) + args


def load_checked(plan_path: str | Path) -> tuple[Plan, RankMap]:
    """Load and validate a self-contained plan, and map its devices to ranks."""
    plan = load_plan(plan_path)
    cluster, cg = plan_context(plan, str(plan_path))
    validate_plan(plan, cluster, cg, source=str(plan_path))
    check_supported(plan, str(plan_path))
    return plan, rank_map(plan, cluster)


def run_local(plan_path: str | Path, *, steps: int = 20, slowdown: list[str] | None = None,
              out_dir: str | Path = "out/run", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
              resume: bool = False, max_restarts: int = 0, extra: list[str] | None = None,
              capture: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
    """Train a single-node plan on this machine with torchrun; returns summary.json's
    content (measured and predicted step time, per-rank times) plus the command and the
    captured output (when capture). Raises RunFailed when training fails."""
    plan, rm = load_checked(plan_path)
    if len(rm.nodes) > 1:
        raise SpecError(str(plan_path), "replicas", f"uses {len(rm.nodes)} nodes ({', '.join(rm.nodes)})",
                        "start one torchrun per node: 'hetalloc run --nodes-print' prints the commands")
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    args = train_args(plan_path, steps=steps, slowdown=slowdown, out_dir=out, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, resume=resume, extra=extra)
    argv = local_command(rm.world_size, args, max_restarts=max_restarts)
    proc = subprocess.run(argv, env=local_env(rm.world_size), text=True, timeout=timeout_s,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    output = proc.stdout or ""
    if proc.returncode != 0 or not summary_path.exists():
        errors = [l for l in output.splitlines() if l.startswith("error:")]
        why = errors[0] if errors else f"torchrun exited with code {proc.returncode}"
        raise RunFailed(f"training failed: {why}" + ("" if capture else " (output above)"))
    summary = json.loads(summary_path.read_text())
    summary["command"] = argv
    if capture:
        summary["output"] = output
    return summary
