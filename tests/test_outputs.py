"""Output files as a user expects them: created with the user's umask (not 0600), no
temporary left behind, and no empty output folder from a command that failed on its
arguments."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hetalloc.cli import main
from hetalloc.fileio import atomic_write_text, remove_temporaries

EX = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a" / "f.json", "{}")
        atomic_write_text(tmp_path / "a" / "f.json", "{}\n")  # replacing keeps the rule
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "f.json").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a" / "f.json").read_text() == "{}\n"
    assert not list((tmp_path / "a").glob(".*"))  # no temporary left


def test_a_plan_written_by_the_cli_is_readable_by_the_group(tmp_path):
    # In a child process: the umask is the process's, set before anything is written.
    code = ("import os, sys; os.umask(0o022); from hetalloc.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-c", code, "plan", "--cluster", str(EX / "lab-16.yaml"), "--model",
                           "gpt2-small", "--global-batch", "16", "--baseline", "even", "--no-compare", "-q",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_remove_temporaries_takes_only_temporaries(tmp_path):
    keep = [tmp_path / "rank_0000.pt", tmp_path / ".hidden", tmp_path / "x.tmp"]
    gone = [tmp_path / ".rank_0000.pt.1a2b3c4d.tmp", tmp_path / ".latest.json.00ff00ff.tmp"]
    for p in keep + gone:
        p.write_text("x")
    assert sorted(remove_temporaries(tmp_path, "rank_0000.pt")) == [gone[0]]
    assert remove_temporaries(tmp_path) == [gone[1]]
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


@pytest.mark.parametrize("args", [["--model", "gpt2-nosuch"], ["--global-batch", "0"], ["--global-batch", "-4"],
                                  ["--time-limit", "-1"]])
def test_demo_with_bad_arguments_leaves_no_output_folder(tmp_path, capsys, args):
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
