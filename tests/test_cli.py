"""The CLI: plan writes a valid plan atomically, --json is machine-readable, errors are one line."""

import builtins
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hetalloc.cli import main

EX = Path(__file__).parent.parent / "examples"


def test_plan_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--cluster", str(EX / "lab-16.yaml"), "--model", "gpt2-small", "--global-batch", "32",
               "--time-limit", "10", "-o", str(out), "--json", "--no-compare"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads(out.read_text())
    assert printed == on_disk
    assert on_disk["schema_version"] == 2 and on_disk["kind"] == "plan"
    assert not list(tmp_path.glob(".plan.json.*"))  # no temp file left behind


def test_plan_table(capsys):
    rc = main(["plan", "--cluster", str(EX / "lab-16.yaml"), "--model", "gpt2-small", "--global-batch", "16",
               "--time-limit", "10", "-q", "--baseline", "even"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("layers", "shares", "iteration", "throughput", "MFU", "bubble"):
        assert word in out


@pytest.mark.parametrize("args, needle", [
    (["--cluster", "missing.yaml", "--model", "gpt2-small"], "missing.yaml: file not found"),
    (["--cluster", str(EX / "lab-16.yaml"), "--model", "gpt9"], "unknown model 'gpt9'"),
    (["--cluster", str(EX / "lab-16.yaml"), "--model", "gpt2-small", "--global-batch", "-4"],
     "--global-batch: must be a whole number >= 1"),
    (["--cluster", str(EX / "lab-16.yaml"), "--model", "gpt2-small", "--seq", "4096"],
     "exceeds gpt2-small's maximum context 1024"),
])
def test_errors_are_one_line(args, needle, capsys):
    rc = main(["plan", *args, "--time-limit", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and needle in err


def test_help_explains_units():
    out = subprocess.run([sys.executable, "-m", "hetalloc.cli", "plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for unit in ("seconds", "samples", "tokens", "GiB"):
        assert unit in out.stdout


def test_demo_plans_and_simulates(tmp_path, capsys):
    """'hetalloc demo' (workflows.demo) on a small model: plan, trace and chart written."""
    rc = main(["demo", "--model", "gpt2-small", "--global-batch", "16", "--time-limit", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "simulated" in out and "s/iteration" in out
    for name in ("plan.json", "trace.json", "gantt.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_broken_subsystem_import_is_an_error(monkeypatch, tmp_path):
    """A subsystem whose commands fail to import must fail loudly, not turn
    'hetalloc simulate' into argparse's "invalid choice"."""
    real_import = builtins.__import__

    def broken(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "simulator.commands" or (name == "simulator" and "commands" in (fromlist or ())):
            raise ImportError("simulator.commands broken on purpose")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.delitem(sys.modules, "hetalloc.cli")  # restored after the test
    with pytest.raises(ImportError, match="broken on purpose"):
        importlib.import_module("hetalloc.cli").main(["simulate", str(tmp_path / "plan.json")])
