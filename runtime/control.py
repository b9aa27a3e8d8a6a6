"""The control channel of an adaptive run: the runtime reports, the workflow decides, the
runtime obeys. Files in one directory (``<out>/control`` by default), so the two sides
need nothing but a shared file system:

- ``events.jsonl`` (runtime -> workflow, appended by rank 0): what the monitor saw
  (``straggler``), that a launch started (``started``, with its wall-clock time), each
  checkpoint (``checkpoint``, with its seconds), each command obeyed (``applied``) and a
  stop for a restart (``stopped``);
- ``command_00001.json``, ``command_00002.json``, ... (workflow -> runtime, each written
  once, atomically): numbered commands, obeyed in order at a step boundary. Every command
  carries the workflow's ``decision`` record, which rank 0 logs (one line, and one record
  in metrics.jsonl) when it obeys it. Kinds:
  ``shares`` (a plan with the same stages and groups and other shares: switched to
  between two steps, no restart), ``restart`` (checkpoint now and stop; the workflow
  relaunches with the plan it names), ``note`` (a decision that changes nothing, logged).

Commands are JSON (a plan inside as its plain dict), read with ``json``; nothing here is
ever unpickled. Never imports torch: the workflow side uses this module too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import Plan

EVENTS = "events.jsonl"
COMMAND_KINDS = ("shares", "restart", "note")
_COMMAND = re.compile(r"command_(\d{5,})\.json")


def command_path(control_dir: str | Path, seq: int) -> Path:
    return Path(control_dir) / f"command_{seq:05d}.json"


def newest_command(control_dir: str | Path) -> int:
    """The highest command number written (0: none)."""
    d = Path(control_dir)
    if not d.is_dir():
        return 0
    nums = [int(m.group(1)) for p in d.iterdir() if (m := _COMMAND.fullmatch(p.name))]
    return max(nums, default=0)


def write_command(control_dir: str | Path, seq: int, kind: str, decision: dict[str, Any],
                  plan: dict[str, Any] | None = None) -> Path:
    if kind not in COMMAND_KINDS:
        raise ValueError(f"unknown command kind '{kind}'")
    if kind in ("shares", "restart") and plan is None:
        raise ValueError(f"a '{kind}' command needs a plan")
    path = command_path(control_dir, seq)
    atomic_write_json(path, {"seq": seq, "kind": kind, "decision": decision, "plan": plan})
    return path


def read_command(control_dir: str | Path, seq: int) -> dict[str, Any]:
    path = command_path(control_dir, seq)
    try:
        cmd = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(str(path), "", f"cannot read the command ({type(e).__name__}: {e})",
                        "the workflow writes commands atomically; do not edit the control directory") from None
    if not isinstance(cmd, dict) or cmd.get("seq") != seq or cmd.get("kind") not in COMMAND_KINDS \
            or not isinstance(cmd.get("decision"), dict):
        raise SpecError(str(path), "", "not a command of this run (fields seq, kind, decision expected)",
                        "do not edit the control directory")
    return cmd


def append_event(control_dir: str | Path, record: dict[str, Any]) -> None:
    """One event line (rank 0 only; flushed at once, the workflow tails the file)."""
    d = Path(control_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / EVENTS, "a") as f:
        f.write(json.dumps(record) + "\n")


class EventReader:
    """Tails events.jsonl: each call returns the complete lines written since the last."""

    def __init__(self, control_dir: str | Path):
        self.path = Path(control_dir) / EVENTS
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def decision_line(d: dict[str, Any]) -> str:
    """The one log line of a decision record (module doc of workflows.adaptive)."""
    parts = [f"adapt: step {d.get('step', '?')}: {d.get('trigger', '')}"]
    pred = d.get("predicted_s") or {}
    if pred:
        parts.append("predicted s/step " + ", ".join(f"{k} {v:.4g}" for k, v in pred.items() if v is not None))
    if d.get("gain_s") is not None:
        parts.append(f"gain over {d.get('horizon_steps')} steps {d['gain_s']:.3g} s vs switch cost "
                     f"{d.get('switch_cost_s', 0.0):.3g} s")
    parts.append(f"-> {d.get('action')}: {d.get('why', '')}")
    return "; ".join(parts)


def same_layout(old: Plan, new: Plan) -> str:
    """'' when `new` differs from `old` in shares (and the order of a stage's groups)
    only, so it can take over between two steps: every device keeps its layers, so its
    parameters, gradient buckets and optimizer state stay; else what differs."""
    for f in ("model", "seq_len", "global_batch", "num_microbatches", "schedule", "grad_sync", "optimizer",
              "optimizer_sharding", "precision"):
        if getattr(old, f) != getattr(new, f):
            return f"{f} differs ({getattr(old, f)!r} -> {getattr(new, f)!r})"
    if len(old.replicas) != len(new.replicas):
        return "the number of replicas differs"
    for ri, (a, b) in enumerate(zip(old.replicas, new.replicas)):
        if len(a.stages) != len(b.stages):
            return f"replica {ri} has another number of stages"
        for si, (s, t) in enumerate(zip(a.stages, b.stages)):
            if (s.start, s.stop, s.recompute) != (t.start, t.stop, t.recompute):
                return f"replica {ri} stage {si} holds other layers"
            if sorted(tuple(g.devices) for g in s.groups) != sorted(tuple(g.devices) for g in t.groups):
                return f"replica {ri} stage {si} has other groups"
    return ""
