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
import re
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetalloc.checks import output_dir
from hetalloc.errors import HetallocError, SpecError
from hetalloc.models import layer_shapes, resolve_model
from hetalloc.plan import Plan, load_plan, plan_context, validate_plan

from .checkpoint_meta import check_latest, plan_key, read_latest
from .config import FAMILIES, check_slowdown, parse_slowdowns
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


def local_env(nproc: int, base: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment for ranks on this machine: gloo on loopback, threads split over ranks
    (or `threads` per rank: a run that must compute as a profile measured it)."""
    env = dict(os.environ if base is None else base)
    for k, v in LAUNCH_ENV.items():
        env.setdefault(k, v)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
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


def visible_gpus() -> int | None:
    """CUDA (or ROCm) devices torch sees on this machine, asked in a child process (this
    one never imports torch); None when that cannot be told."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def check_run(plan_path: str | Path, *, steps: int = 20, slowdown: list[str] | None = None,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
              model: str | None = None, here: bool = True) -> tuple[Plan, RankMap]:
    """Everything about a run that can be checked before any rank starts, as one-line
    SpecErrors: the plan valid against its cluster and cost graph, its ranks all CPU or all
    GPU, and (here: when it runs on this machine) the GPUs it needs present; --steps,
    --slowdown (syntax, factor, rank or device), --checkpoint-every and --resume with a
    checkpoint directory whose latest.json is of this plan and world size (or whose step
    directory holds the plan that saved it: then the ranks reshard it); the model
    buildable by the runtime with the plan's layers and sequence length. Returns what
    load_checked does."""
    source = str(plan_path)
    plan = load_plan(plan_path)
    cluster, cg = plan_context(plan, source)
    validate_plan(plan, cluster, cg, source=source)
    check_supported(plan, source)
    rm = rank_map(plan, cluster)
    if steps < 1:
        raise SpecError("--steps", "", f"must be a whole number >= 1, got {steps}", "train for at least one step")
    fixed, changes = parse_slowdowns(slowdown)
    check_slowdown({**fixed, **{k: 1.0 for k in changes}}, rm.world_size, cluster.device_by_id)
    if checkpoint_every < 0:
        raise SpecError("--checkpoint-every", "", f"must be >= 0, got {checkpoint_every}", "give K to save every K steps")
    for flag, given in (("--checkpoint-every", checkpoint_every > 0), ("--resume", resume)):
        if given and not checkpoint_dir:
            raise SpecError(flag, "", "needs --checkpoint-dir", "say where the checkpoints are (or go)")
    if resume and checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        check_latest(read_latest(checkpoint_dir), checkpoint_dir, plan_key(plan), rm.world_size)
    cpu = {cluster.dtype(d).vendor == "cpu" for d in rm.devices}
    if len(cpu) > 1:
        raise SpecError(source, "replicas", "mixes CPU and GPU devices", "plan CPU ranks and GPU ranks separately")
    if here and cpu == {False} and len(rm.nodes) == 1:
        need, have = rm.world_size, visible_gpus()
        if have is not None and have < need:
            types = ", ".join(sorted({cluster.dtype(d).name for d in rm.devices}))
            raise SpecError(source, "replicas", f"needs {need} GPUs ({types}) on this machine, torch sees {have}",
                            "run on the plan's cluster, or plan for this machine (examples/cpu-4.yaml)")
    check_model(plan, cg, model, source)
    return plan, rm


def check_model(plan: Plan, cg, model: str | None, source: str) -> None:
    """The model the ranks will build (--model, else the one the plan's cost graph
    records) resolves, is of a family the runtime builds, and has the plan's layers and
    context (SpecError otherwise)."""
    flag = "--model" if model else source
    shape = resolve_model(model) if model else cg.shape(source)
    if shape.family not in FAMILIES:
        raise SpecError(flag, "", f"the runtime cannot build '{shape.name}' (family '{shape.family}')",
                        f"runtime families: {', '.join(FAMILIES)}")
    if plan.seq_len > shape.max_seq and shape.family != "llama":
        raise SpecError(flag, "", f"the plan's sequence length {plan.seq_len} exceeds '{shape.name}''s context "
                        f"{shape.max_seq}", f"use the model the plan was made for ('{plan.model}')")
    layers = len(layer_shapes(shape, plan.seq_len, 4))
    if layers != cg.num_layers:
        raise SpecError(flag, "", f"'{shape.name}' has {layers} layers, the plan's cost graph {cg.num_layers}",
                        f"use the model the plan was made for ('{plan.model}')")


def run_local(plan_path: str | Path, *, steps: int = 20, slowdown: list[str] | None = None,
              out_dir: str | Path = "out/run", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
              resume: bool = False, max_restarts: int = 0, model: str | None = None,
              extra: list[str] | None = None, capture: bool = False,
              timeout_s: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train a single-node plan on this machine with torchrun; returns summary.json's
    content (measured and predicted step time, per-rank times) plus the command and the
    captured output (when capture). Checks everything check_run does first (SpecError,
    nothing launched). Raises RunFailed when training fails: with the ranks' one-line
    error when they said one (torchrun's failure report is then left out), else with the
    output shown (capture=False) or its tail (capture=True). threads: intra-op threads
    per rank (default: the cores split over the ranks)."""
    plan, rm = check_run(plan_path, steps=steps, slowdown=slowdown, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, resume=resume, model=model)
    if len(rm.nodes) > 1:
        raise SpecError(str(plan_path), "replicas", f"uses {len(rm.nodes)} nodes ({', '.join(rm.nodes)})",
                        "start one torchrun per node: 'hetalloc run --nodes-print' prints the commands")
    output_dir(out_dir, "--out")
    if checkpoint_dir is not None:
        output_dir(checkpoint_dir, "--checkpoint-dir")
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    extra = list(extra or []) + (["--model", model] if model else [])
    args = train_args(plan_path, steps=steps, slowdown=slowdown, out_dir=out, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, resume=resume, extra=extra)
    argv = local_command(rm.world_size, args, max_restarts=max_restarts)
    env = local_env(rm.world_size, threads=threads)
    if capture:
        proc = subprocess.run(argv, env=env, text=True, timeout=timeout_s, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        output, rc = proc.stdout or "", proc.returncode
        errors = [l for l in output.splitlines() if l.startswith("error:")]
        held = output.splitlines(keepends=True)[-15:]
    else:
        output = ""
        rc, errors, held = run_filtered(argv, env, timeout_s)
    if rc != 0 or not summary_path.exists():
        if errors:
            raise RunFailed(errors[0].removeprefix("error: "))
        if capture:
            raise RunFailed(f"training failed: torchrun exited with code {rc}; last lines:\n{''.join(held)}")
        sys.stderr.writelines(held)
        raise RunFailed(f"training failed: torchrun exited with code {rc} (output above)")
    if not capture:
        sys.stderr.writelines(held)
    summary = json.loads(summary_path.read_text())
    summary["command"] = argv
    if capture:
        summary["output"] = output
    return summary


TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
"""A line of torchrun's own logger (glog style: 'E1130 15:08:14.508000 30114 torch/...')."""


def run_filtered(argv: list[str], env: dict[str, str], timeout_s: float | None = None,
                 err=None) -> tuple[int, list[str], list[str]]:
    """Run a torchrun command with the ranks' stdout passed through and their stderr read
    line by line: an ``error:`` line (a rank's one-line error) is kept, and from then on,
    or from torchrun's own log lines (its failure report, a traceback of ChildFailedError),
    lines are held back instead of printed. Returns (exit code, the error lines, the held
    lines in order), for the caller to print one line or, when no rank said what went
    wrong, the held output."""
    err = err or sys.stderr
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    errors: list[str] = []
    held: list[str] = []
    failing = False
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("error:"):
                errors.append(line.rstrip("\n"))
                failing = True
            elif failing or TORCHRUN_LOG.match(line):
                held.append(line)
                failing = failing or "failed (exitcode" in line
            else:
                err.write(line)
                err.flush()
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun stops its ranks on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if timer:
            timer.cancel()
    return rc, errors, held
