"""Checkpoints that execute nothing and survive damage, and metrics that hold each step
once: one rank in this process (gloo, world size 1, the runtime's own Trainer), with
files damaged the ways a crash, a full disk or a hostile user damages them. The
multi-rank paths (ranks agreeing on a fallback, a refused file under torchrun) are in
tests/test_runtime_resume.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hetalloc.cluster import load_cluster
from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_json
from runtime import checkpoint
from runtime.config import TrainConfig
from runtime.metrics import StepTimes, keep_steps, measured_records
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def one_rank(monkeypatch):
    """The environment of a single process started without torchrun (a HashStore group)."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def plan():
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    return hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 16), [[((0, 6), [("host/2", 4)])]], num_microbatches=2)


def cfg(tmp: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, dropout=0.1, out_dir=str(tmp / "out"), checkpoint_dir=str(tmp / "ckpt"),
                       checkpoint_every=2, **kw)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_model_parameters()}


def steps_in(out: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def trained(tmp_path, one_rank):
    """6 steps, checkpoints at 4 and 6 (2 is pruned); the parameters after step 6."""
    t = Trainer(plan(), cfg(tmp_path, 6))
    t.run()
    return tmp_path, params(t)


def resume(tmp: Path, steps: int = 6) -> Trainer:
    return Trainer(plan(), cfg(tmp, steps, resume=True))


def one_warning(capsys) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("warning: "), err
    return err[0]


def test_rank_files_hold_tensors_and_plain_values_and_resume_exactly(trained, capsys):
    tmp, final = trained
    assert checkpoint.saved_steps(tmp / "ckpt") == [6, 4]
    state = torch.load(checkpoint.rank_file(tmp / "ckpt", 4, 0), weights_only=True)
    assert state["format"] == checkpoint.FORMAT and state["step"] == 4 and state["world_size"] == 1
    assert isinstance(state["rng"]["python"]["internal"], list) and state["data"] == {"next_step": 5, "next_sample": 32}
    # Resume from step 4 (as if 6 were never written): steps 5-6 again, bitwise the same.
    shutil.rmtree(checkpoint.step_dir(tmp / "ckpt", 6))
    atomic_write_json(tmp / "ckpt" / "latest.json", {"step": 4, "plan_key": state["plan_key"], "world_size": 1})
    t = resume(tmp)
    assert t.done == 4 and capsys.readouterr().err == ""
    t.run()
    assert all(torch.equal(a, final[n]) for n, a in params(t).items())


def test_a_malicious_rank_file_is_refused_and_never_runs(trained, capsys):
    tmp, _ = trained
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 6, "plan_key": "x", "params": {}, "optimizer": {}, "rng": {}, "hook": Payload()},
               checkpoint.rank_file(tmp / "ckpt", 6, 0))
    with pytest.raises(SpecError) as e:
        resume(tmp)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{checkpoint.rank_file(tmp / 'ckpt', 6, 0)}: refused: it holds a reference to posix.system")
    assert "could run code" in msg and not marker.exists()


def test_a_truncated_rank_file_falls_back_to_the_checkpoint_before(trained, capsys):
    tmp, final = trained
    f = checkpoint.rank_file(tmp / "ckpt", 6, 0)
    f.write_bytes(f.read_bytes()[:1000])
    t = resume(tmp)
    assert t.done == 4
    line = one_warning(capsys)
    assert line == (f"warning: checkpoint step 6 is incomplete: {f} is damaged (RuntimeError: PytorchStreamReader "
                    f"failed reading zip archive: failed finding central directory); resuming from step 4, the "
                    f"newest complete checkpoint")
    t.run()  # steps 5, 6 again: the same parameters as before the damage
    assert all(torch.equal(a, final[n]) for n, a in params(t).items())
    assert steps_in(tmp / "out") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_a_damaged_latest_json_falls_back_to_the_newest_complete_checkpoint(trained, capsys, damage):
    tmp, _ = trained
    latest = tmp / "ckpt" / "latest.json"
    if damage == "truncated":
        latest.write_text(latest.read_text()[:9])
    elif damage == "empty":
        latest.write_text("")
    else:
        latest.unlink()
    assert resume(tmp).done == 6
    line = one_warning(capsys)
    assert line.startswith(f"warning: {latest} is ") and line.endswith("; resuming from step 6, the newest "
                                                                       "complete checkpoint")


def test_latest_json_naming_a_missing_step_says_so(trained, capsys):
    tmp, _ = trained
    latest = tmp / "ckpt" / "latest.json"
    d = json.loads(latest.read_text())
    atomic_write_json(latest, d | {"step": 8})
    assert resume(tmp, 8).done == 6
    assert one_warning(capsys) == (f"warning: {latest} names step 8, but {tmp / 'ckpt' / 'step_0000008'} is "
                                   "missing; resuming from step 6, the newest complete checkpoint")
    for s in (4, 6):
        shutil.rmtree(checkpoint.step_dir(tmp / "ckpt", s))
    with pytest.raises(SpecError) as e:
        resume(tmp, 8)
    assert str(e.value) == (f"{tmp / 'ckpt'}: {latest} names step 8, but {tmp / 'ckpt' / 'step_0000008'} is "
                            "missing; no complete checkpoint is left — restore the damaged files, or start a new "
                            "checkpoint directory to train from step 1")


def other_plan():
    """The same device and global batch in 4 micro-batches of 2: another plan key."""
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    return hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 16), [[((0, 6), [("host/2", 2)])]], num_microbatches=4)


def test_another_plan_reshards_from_a_checkpoint_that_carries_its_plan_and_refuses_one_that_does_not(trained,
                                                                                                   capsys):
    tmp, final = trained
    t = Trainer(other_plan(), cfg(tmp, 6, resume=True))
    assert t.done == 6 and all(torch.equal(a, final[n]) for n, a in params(t).items())
    assert "resharded to this plan's 1 ranks, next sample 48" in capsys.readouterr().out
    for s in (4, 6):  # as written before checkpoints carried their plan
        (checkpoint.step_dir(tmp / "ckpt", s) / "plan.json").unlink()
    dist.destroy_process_group()
    with pytest.raises(SpecError) as e:
        Trainer(other_plan(), cfg(tmp, 6, resume=True))
    assert str(e.value) == (f"{checkpoint.rank_file(tmp / 'ckpt', 6, 0)}: plan_key: the checkpoint was written for "
                            "another plan — resume with the plan that wrote it, or start a new checkpoint directory")


def test_a_run_killed_while_writing_its_first_checkpoint_starts_over(tmp_path, one_rank, capsys):
    partial = checkpoint.rank_file(tmp_path / "ckpt", 2, 0)
    partial.parent.mkdir(parents=True)
    (partial.parent / ".rank_0000.pt.0badc0de.tmp").write_bytes(b"half")
    t = resume(tmp_path)
    assert t.done == 0
    assert one_warning(capsys) == (f"warning: {tmp_path / 'ckpt' / 'latest.json'} is missing; checkpoint step 2 "
                                   f"is incomplete: {partial} is missing; no complete checkpoint, starting at step 1")
    t.run()
    assert not list((tmp_path / "ckpt").rglob("*.tmp"))  # the killed writer's temporary went at the next save
    assert checkpoint.saved_steps(tmp_path / "ckpt") == [6, 4]


def test_the_next_save_deletes_temporaries_and_an_abandoned_timeline(trained):
    tmp, _ = trained
    ck = tmp / "ckpt"
    stale = [ck / ".latest.json.5eed0001.tmp", checkpoint.step_dir(ck, 4) / ".rank_0000.pt.5eed0002.tmp",
             checkpoint.step_dir(ck, 6) / ".rank_0000.pt.5eed0003.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    checkpoint.step_dir(ck, 6).rename(checkpoint.step_dir(ck, 10))  # a timeline that went further
    atomic_write_json(ck / "latest.json", json.loads((ck / "latest.json").read_text()) | {"step": 4})
    stale[2] = checkpoint.step_dir(ck, 10) / stale[2].name
    resume(tmp, 8).run()  # from 4; saves 6 and 8
    assert checkpoint.saved_steps(ck) == [8, 6]
    assert not any(p.exists() for p in stale) and not list(ck.rglob("*.tmp"))
    assert checkpoint.latest_step(ck) == 8


def test_metrics_and_summary_cover_the_whole_run_once(trained):
    tmp, _ = trained
    out = tmp / "out"
    # A killed attempt had gone on to step 7, its last line torn, after checkpoint 6.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 9.0}) + "\n" + '{"step": 8, "lo')
    summary = resume(tmp, 9).run()
    assert steps_in(out) == list(range(1, 10))
    ranks = [json.loads(l) for l in (out / "metrics.rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ranks] == list(range(1, 10))
    assert [r["launch_first_step"] for r in ranks] == [1] * 6 + [7] * 3
    assert summary["first_step"] == 1 and summary["last_step"] == 9 and len(summary["losses"]) == 9
    assert summary["launch_first_steps"] == [1, 7]
    assert summary["measured_steps"] == 9 - 2  # each launch's first step is warm-up
    assert summary["losses"][:6] == [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text()
                                     .splitlines()[:6]]


def test_keep_steps_and_measured_records(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s, "v": v}) + "\n" for s, v in [(1, 0), (2, 0), (3, 0), (2, 1), (4, 0)])
                 + "not json\n" + '{"step": 5')
    assert keep_steps(p, 3) == [{"step": 1, "v": 0}, {"step": 2, "v": 1}, {"step": 3, "v": 0}]
    assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [1, 2, 3]
    assert keep_steps(p, 0) == [] and p.read_text() == ""
    t = [StepTimes(step_s=float(i)) for i in range(6)]
    launches = [(1, t[0]), (1, t[1]), (1, t[2]), (4, t[3]), (4, t[4]), (6, t[5])]
    assert measured_records(launches, 1) == [t[1], t[2], t[4], t[5]]  # a 1-step launch is kept whole
    assert measured_records(launches, 0) == t
