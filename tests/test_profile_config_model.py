"""``hetalloc profile`` of a model given as a Hugging Face config file (torchrun, 2 gloo
ranks, short settings): the closing runtime-overhead runs build the model from the
recorded config, the profile records it, reuse recognises it, and a failed profile
leaves the earlier complete profile as it was and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allocator import make_plan
from hetalloc.errors import SpecError
from hetalloc.models import resolve_model
from hetalloc.plan import load_plan, plan_context
from runtime.launch import RunFailed
from runtime.profile import command
from runtime.profile.command import STAGING, run_profile
from workflows.loop import profile_batch_sizes, profile_machine

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "llama-tiny.json"
FILES = ("cost_graph.json", "cluster.yaml", "report.json")


def test_config_file_model_profile_completes_records_the_config_and_is_reused(tmp_path, monkeypatch):
    out = tmp_path / "prof"
    report = run_profile(out, nproc=2, model=str(CONFIG), seq=32, batch_sizes="1,2", warmup=1, repeats=2,
                         link_repeats=2, timeout_s=300)
    shape = resolve_model(str(CONFIG))
    assert report["model"] == "llama-tiny" and report["model_spec"] == shape.to_dict()
    assert set(report["runtime_overhead"]["per_type"])  # the closing training runs built the model
    assert not (out / STAGING).exists() and all((out / f).exists() for f in FILES)

    # Reuse compares the model itself, not the path with the recorded name.
    before = {f: (out / f).stat().st_mtime_ns for f in FILES}
    prof = profile_machine(out, nproc=2, model=str(CONFIG), seq=32, batch_sizes="1,2", repeats=2, reuse=True)
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == before
    assert prof.cost_graph.shape() == shape and prof.cost_graph.shape().hf_config == shape.hf_config

    # A plan from the profile carries the config: the runtime needs no --model.
    plan = make_plan(prof.cluster, prof.cost_graph, 4, time_limit=5)
    plan.save(tmp_path / "plan.json")
    assert plan_context(load_plan(tmp_path / "plan.json"))[1].shape().hf_config == json.loads(CONFIG.read_text())

    # A failed profile into the same directory leaves the complete one untouched: refused
    # before launching, and (the launcher's checks skipped) refused by the ranks.
    saved = {f: (out / f).read_bytes() for f in FILES}
    bad = dict(nproc=2, model=str(CONFIG), seq=32, batch_sizes="1", slowdown=["5=2"], warmup=1, repeats=1,
               link_repeats=1, timeout_s=120)
    with pytest.raises(SpecError, match="--slowdown"):
        run_profile(out, **bad)
    monkeypatch.setattr(command, "check_profile", lambda *a, **k: None)
    with pytest.raises(RunFailed, match="--slowdown"):
        run_profile(out, **bad)
    assert {f: (out / f).read_bytes() for f in FILES} == saved
    assert not (out / STAGING).exists()


def test_profile_batch_sizes_reach_the_largest_share_a_plan_may_give():
    """A plan of global batch B may give one device all B samples: its profile times up
    to B (powers of two, and B), so that no table is read beyond its largest size."""
    assert profile_batch_sizes(32) == "1,2,4,8,16,32"
    assert profile_batch_sizes(24) == "1,2,4,8,16,24"
    assert profile_batch_sizes(1) == "1"
    with pytest.raises(ValueError, match="largest must be at least 1"):
        profile_batch_sizes(0)
