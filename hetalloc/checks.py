"""Checks of a command's arguments, made before any work starts.

Every verb's parsed arguments pass through ``check_args`` (hetalloc/cli.py calls it right
after parsing), so a bad value is one line naming the flag or the file, exit code 2,
before anything is solved, simulated, launched or written. The rules are keyed by the
argument's name (argparse ``dest``) and mean the same for every verb:

- input files (``--cluster``, ``--cost-graph``, ``--efficiency``, a plan): a readable
  regular file;
- output files (``-o``, ``--trace``, ``--gantt``, ``--utilisation``, ``--report``,
  ``--chart``, ``--plot``): not a directory or a device, and writable where they will be
  written (probed with a temporary file that is deleted at once);
- output directories (``--out``, ``--checkpoint-dir``): a directory, or one that can be
  created, and writable;
- numbers: ``--seq >= 1``, ``--time-limit > 0``, ``--gap >= 0``, ``--bucket-mb > 0``, ...

Checks that need the inputs' content (a plan against its cluster, a model config) stay
with the loaders (hetalloc.plan.validate_plan, hetalloc.models, hetalloc.costgraph).

Never: import a subsystem, or leave anything behind on disk.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError


@dataclass(frozen=True, slots=True)
class Bound:
    """A number's allowed range: value >= low (or > low when not inclusive)."""

    flag: str
    low: float
    inclusive: bool = True
    integer: bool = False
    high: float = math.inf
    fix: str = ""
    allow_inf: bool = False
    high_inclusive: bool = True

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # not this rule's kind of value (e.g. whatif's --seq is a list of scenarios)
        ok = value >= self.low if self.inclusive else value > self.low
        ok = ok and (value <= self.high if self.high_inclusive else value < self.high) and not math.isnan(value)
        ok = ok and (self.allow_inf or math.isfinite(value))
        if not ok:
            op = ">=" if self.inclusive else ">"
            what = f"a whole number {op} {self.low:g}" if self.integer else f"{op} {self.low:g}"
            if self.high < math.inf:
                what += f" and {'<=' if self.high_inclusive else '<'} {self.high:g}"
            raise SpecError(self.flag, "", f"must be {what}, got {value:g}", self.fix)


NUMBERS: dict[str, Bound] = {b.flag.lstrip("-").replace("-", "_"): b for b in [
    Bound("--seq", 1, integer=True, fix="give the sequence length in tokens, e.g. --seq 1024"),
    Bound("--global-batch", 1, integer=True, fix="give the number of samples per iteration"),
    Bound("--time-limit", 0, inclusive=False, allow_inf=True, fix="give the time limit in seconds, e.g. --time-limit 30"),
    Bound("--gap", 0, fix="give a relative gap, e.g. --gap 0.01 for 1 %"),
    Bound("--bucket-mb", 0, inclusive=False, fix="give the gradient bucket size in MiB, e.g. --bucket-mb 25"),
    Bound("--iterations", 1, integer=True, fix="simulate at least one"),
    Bound("--steps", 1, integer=True, fix="train for at least one step"),
    Bound("--deadline", 0, inclusive=False, fix="give the deadline in hours"),
    Bound("--checkpoint-every", 0, integer=True, fix="give K >= 1 to save every K steps, or 0 for never"),
    Bound("--max-restarts", 0, integer=True, fix="give how many times torchrun may restart failed ranks"),
    Bound("--lr", 0, inclusive=False, fix="give a positive learning rate, e.g. --lr 1e-3"),
    Bound("--nproc", 1, integer=True, fix="profile one rank or more"),
    Bound("--warmup", 0, integer=True, fix="give the untimed passes per batch size, e.g. --warmup 3"),
    Bound("--repeats", 1, integer=True, fix="time at least one pass per batch size"),
    Bound("--link-repeats", 1, integer=True, fix="time at least one transfer per message size"),
    Bound("--master-port", 1, integer=True, high=65535, fix="give a TCP port"),
    Bound("--eval-every", 0, integer=True, fix="give K >= 1 to evaluate every K steps, or 0 for never"),
    Bound("--eval-batches", 1, integer=True, fix="evaluate at least one global batch"),
    Bound("--val-fraction", 0, high=1, high_inclusive=False, fix="give the share kept for validation, e.g. 0.1"),
]}
"""Numeric arguments by dest (the same bound for every verb that has the flag)."""

INPUT_FILES: dict[str, tuple[str, str, str]] = {
    "cluster": ("--cluster", "cluster spec YAML", "check the path (examples/ has sample clusters)"),
    "cost_graph": ("--cost-graph", "cost graph JSON written by 'hetalloc profile'", "check the path"),
    "efficiency": ("--efficiency", "efficiency.json written by 'hetalloc profile --calibrate'", "check the path"),
    "plan": ("", "plan JSON written by 'hetalloc plan'", "check the path or run 'hetalloc plan -o' first"),
}
"""dest -> (flag, what the file is, the fix when it is missing); a plan is a positional
argument: its path names it."""

OUTPUT_FILES: dict[str, str] = {"output": "-o/--output", "trace": "--trace", "gantt": "--gantt",
                                "utilisation": "--utilisation", "report": "--report", "chart": "--chart",
                                "plot": "--plot"}
OUTPUT_DIRS: dict[str, str] = {"out": "--out", "checkpoint_dir": "--checkpoint-dir"}


def _where(flag: str, path: str) -> str:
    return f"{flag} {path}" if flag else path


def input_file(path: str | os.PathLike, flag: str = "", what: str = "file", missing_fix: str = "check the path") -> None:
    """Raise SpecError unless `path` is a regular file this process can read."""
    p = Path(path)
    where = _where(flag, str(p))
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SpecError(where, "", "file not found", missing_fix) from None
    except OSError as e:
        raise SpecError(where, "", f"cannot be read ({e.strerror or e})", f"pass the {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(where, "", "is a directory, not a file", f"pass the {what}")
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(where, "", "is not a regular file", f"pass the {what}")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise SpecError(where, "", f"cannot be read ({e.strerror or e})", "check its permissions") from None


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _probe(directory: Path) -> str | None:
    """None when a file can be created in `directory` (tried, then deleted), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hetalloc-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def _writable_dir(where: str, directory: Path, fix: str) -> None:
    """`directory` exists, or its nearest existing ancestor is a directory we can write in."""
    anc = _nearest_existing(directory)
    if not anc.is_dir():
        raise SpecError(where, "", f"{anc} is not a directory", fix)
    why = _probe(anc)
    if why is not None:
        raise SpecError(where, "", f"cannot write in {anc} ({why})", fix)


def output_file(path: str | os.PathLike, flag: str) -> None:
    """Raise SpecError unless a file can be written (atomically, by rename) at `path`."""
    p = Path(path)
    where = _where(flag, str(p))
    if p.is_dir():
        raise SpecError(where, "", "is a directory", f"give a file name, e.g. {flag.split('/')[-1]} {p / 'out'}")
    if p.exists() and not p.is_file():
        raise SpecError(where, "", "is not a regular file (writing would replace it)", "give a file name")
    _writable_dir(where, p.parent, "choose a writable place")


def output_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise SpecError unless `path` is (or can be created as) a directory we can write in."""
    p = Path(path)
    where = _where(flag, str(p))
    if p.exists() and not p.is_dir():
        raise SpecError(where, "", "is a file, not a directory", "give a directory")
    _writable_dir(where, p, "choose a writable directory")


def check_args(args: Namespace) -> None:
    """Check every argument of a parsed command line by the rules above; raise SpecError
    (one line naming the flag or file) at the first bad one."""
    values = vars(args)
    for dest, rule in NUMBERS.items():
        if values.get(dest) is not None:
            rule.check(values[dest])
    for dest, (flag, what, missing_fix) in INPUT_FILES.items():
        if isinstance(values.get(dest), str):
            input_file(values[dest], flag, what, missing_fix)
    model = values.get("model")
    if isinstance(model, str) and model.endswith(".json"):
        input_file(model, "--model", "Hugging Face config.json", "check the path of the model's config.json")
    inputs = {os.path.realpath(values[d]): flag or "the plan being read" for d, (flag, *_) in INPUT_FILES.items()
              if isinstance(values.get(d), str)}
    outputs: dict[str, str] = {}
    for dest, flag in OUTPUT_FILES.items():
        if isinstance(values.get(dest), str):
            output_file(values[dest], flag)
            real = os.path.realpath(values[dest])
            if real in inputs or real in outputs:
                raise SpecError(_where(flag, values[dest]), "", f"is also {inputs.get(real) or outputs[real]}",
                                "give every output its own file name")
            outputs[real] = flag
    if not values.get("nodes_print"):  # printed commands run elsewhere: their directories are not here
        for dest, flag in OUTPUT_DIRS.items():
            if isinstance(values.get(dest), str):
                output_dir(values[dest], flag)
