"""Equivalence: plans trained with torchrun (gloo, 2, 3 and 4 ranks) compute exactly what
single-process training on the whole batch computes (runtime.reference).

One torchrun launch per world size runs every configuration of that size (start-up is
the expensive part); this file is also the worker script those launches run. Models
come from the built-in table and from Hugging Face configs (examples/*-tiny.json:
Llama with grouped-query attention, Qwen2, OPT); data from the synthetic generator, the
shipped text and a uint16 .bin token file. Plan schema 2: tensor-parallel groups
(a device tuple), recomputation per stage, zero1. Configurations in RESUMED are also
trained a second time in the same launch, stopped after step 3 (checkpoint at step 2)
and resumed by a new Trainer from that checkpoint: their step-5 checkpoint and losses
must equal the uninterrupted run's bit for bit. Configurations in RESHARDED are another
plan of the same model and batch (other stage boundaries, tensor-parallel degrees, zero1
groups) that resumes from a configuration's step-5 checkpoint (runtime.reshard) and saves
it again at once: every parameter and every optimizer state tensor must come back
bitwise, cut into this plan's shards and gathered again. The checks after 5 steps:
- float64 runs (the exactness check): every step's loss, every validation loss and
  every copy of every parameter within 1e-9 relative of the reference;
- float32 SGD: the same per-tensor bound;
- float32 AdamW: loss within 1e-5 and the whole model within 1e-5 (relative L2).
  Per tensor, fp32 AdamW cannot meet 1e-5 under *any* change of summation order: the
  gradient of the attention key bias is mathematically zero (softmax is shift
  invariant), so it is pure round-off, which Adam divides by its own size. The
  reference against itself with micro-batched accumulation shows the same ~5e-4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetalloc.cluster import load_cluster
from runtime.config import TrainConfig
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.testing import (checkpoint_optimizer, checkpoint_params, global_relative_error, losses,
                             max_relative_error, torchrun)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
H0, H1, H2, H3 = "host/0", "host/1", "host/2", "host/3"
TP01, TP12, TP23 = (H0, H1), (H1, H2), (H2, H3)
"""Tensor-parallel groups of two."""
LLAMA, QWEN2, OPT = (str(ROOT / "examples" / f"{n}-tiny.json") for n in ("llama", "qwen2", "opt"))
TOKENS_BIN = "<workdir>/tokens.bin"
"""A uint16 token file (nanoGPT's layout) the launch fixture writes: 30,000 random ids < 256."""

# name -> (model, seq, replicas, plan options, config options)
CONFIGS: dict[int, dict[str, tuple]] = {
    2: {
        "gpt2_2stages_1f1b": ("gpt2-tiny", 32, [[((0, 3), [(H0, 2)]), ((3, 6), [(H1, 2)])]],
                              dict(num_microbatches=2, schedule="1f1b"), dict(dtype="float64")),
        "gpt2_one_stage_shares_3to1": ("gpt2-tiny", 32, [[((0, 6), [(H0, 3), (H1, 1)])]],
                                       dict(num_microbatches=2), dict(dtype="float64")),
        "gpt2_shares_3to1_param_server": ("gpt2-tiny", 32, [[((0, 6), [(H0, 3), (H1, 1)])]],
                                          dict(num_microbatches=2, grad_sync="param_server"),
                                          dict(dtype="float64")),
        "bert_2stages_gpipe": ("bert-tiny", 32, [[((0, 2), [(H0, 2)]), ((2, 6), [(H1, 2)])]],
                               dict(num_microbatches=3, schedule="gpipe"), dict(dtype="float64")),
        "gpt2_2stages_gpipe_fp32": ("gpt2-tiny", 32, [[((0, 3), [(H0, 2)]), ((3, 6), [(H1, 2)])]],
                                    dict(num_microbatches=2, schedule="gpipe"), dict()),
        "mlp_2stages_sgd_fp32": ("mlp-tiny", 16, [[((0, 3), [(H0, 4)]), ((3, 6), [(H1, 4)])]],
                                 dict(num_microbatches=2, optimizer="sgd"), dict()),
        # Llama-shaped with grouped-query attention (4 heads, 2 KV heads), rotary positions
        # recomputed on each stage; validation through both stages.
        "llama_gqa_2stages_1f1b": (LLAMA, 32, [[((0, 3), [(H0, 2)]), ((3, 6), [(H1, 2)])]],
                                   dict(num_microbatches=3, schedule="1f1b"),
                                   dict(dtype="float64", dataset="text", eval_every=2)),
        # Qwen2 (q/k/v biases, 4:1 GQA), one stage on two ranks with shares 3:1, reading
        # a .bin token file; validation with two batches.
        "qwen2_shares_3to1_bin": (QWEN2, 32, [[((0, 6), [(H0, 3), (H1, 1)])]], dict(num_microbatches=2),
                                  dict(dtype="float64", dataset=TOKENS_BIN, eval_every=2, eval_batches=2)),
        # OPT (learned positions with offset 2, project_in/out around the blocks).
        "opt_2stages_1f1b": (OPT, 32, [[((0, 2), [(H0, 2)]), ((2, 6), [(H1, 2)])]],
                             dict(num_microbatches=2, schedule="1f1b"), dict(dtype="float64")),
    },
    4: {
        "gpt2_2stages_x_2replicas": ("gpt2-tiny", 32, [[((0, 3), [(H0, 2)]), ((3, 6), [(H1, 2)])],
                                                      [((0, 3), [(H2, 2)]), ((3, 6), [(H3, 2)])]],
                                     dict(num_microbatches=2), dict(dtype="float64")),
        # stage of width 2 (shares 2:1) feeding a stage of width 1, plus a one-stage replica
        # with another micro-batch size: gradient groups of different membership per layer.
        "gpt2_widths_2to1_plus_replica_param_server": (
            "gpt2-tiny", 32, [[((0, 3), [(H0, 2), (H1, 1)]), ((3, 6), [(H2, 3)])], [((0, 6), [(H3, 1)])]],
            dict(num_microbatches=2, schedule="gpipe", grad_sync="param_server"), dict(dtype="float64")),
        "bert_replicas_other_cuts_uneven": (
            "bert-tiny", 32, [[((0, 2), [(H0, 3)]), ((2, 6), [(H1, 3)])], [((0, 4), [(H2, 1)]), ((4, 6), [(H3, 1)])]],
            dict(num_microbatches=2), dict(dtype="float64")),
        # Tensor parallelism 2 in both replicas (micro-batches 2 and 1): gradients reduced
        # slice by slice (ranks 0+2, 1+3), with zero1 on the tensor-parallel shards.
        "llama_tp2_x_2replicas_zero1": (LLAMA, 32, [[((0, 6), [(TP01, 2)])], [((0, 6), [(TP23, 1)])]],
                                        dict(num_microbatches=2, optimizer_sharding="zero1"),
                                        dict(dtype="float64")),
    },
    3: {
        # A tensor-parallel stage of 2 (vocabulary-parallel embedding, sharded blocks)
        # feeding a stage of one; validation through both.
        "llama_tp2_stage_plus_tp1_stage": (LLAMA, 32, [[((0, 3), [(TP01, 2)]), ((3, 6), [(H2, 2)])]],
                                           dict(num_microbatches=3, schedule="1f1b"),
                                           dict(dtype="float64", dataset="text", eval_every=2)),
        # Recomputation on both stages; GPT-2's fused q/k/v Conv1D split by heads in a
        # tensor-parallel last stage (vocabulary-parallel head and loss, also for the
        # validation loss) fed by one device.
        "gpt2_recompute_then_tp2_stage": ("gpt2-tiny", 32, [[((0, 3), [(H0, 2)], "full"),
                                                             ((3, 6), [(TP12, 2)], "full")]],
                                          dict(num_microbatches=2, schedule="gpipe"),
                                          dict(dtype="float64", eval_every=5)),
        # One stage held by a group of 2 (share 2) and a single device (share 1): gradients
        # reduced slice by slice, the single device's halves with each rank of the group.
        "gpt2_tp2_group_next_to_one_device": ("gpt2-tiny", 32, [[((0, 6), [(TP01, 2), (H2, 1)])]],
                                              dict(num_microbatches=2), dict(dtype="float64")),
        # zero1 over a stage of two devices with shares 3:1 (optimizer state in halves).
        "llama_zero1_shares_3to1": (LLAMA, 32, [[((0, 3), [(H0, 3), (H1, 1)]), ((3, 6), [(H2, 4)])]],
                                    dict(num_microbatches=2, optimizer_sharding="zero1"), dict(dtype="float64")),
    },
}
RESUMED = {"llama_tp2_x_2replicas_zero1", "llama_tp2_stage_plus_tp1_stage", "llama_zero1_shares_3to1",
           "gpt2_tp2_group_next_to_one_device"}
RESUME_AT = 2

# name -> (the configuration whose step-5 checkpoint it resumes from, replicas, plan options)
RESHARDED: dict[int, dict[str, tuple]] = {
    # TP 2 x 2 replicas with zero1 -> two stages: zero1 over two single devices, then TP 2.
    4: {"reshard_to_2stages_zero1_then_tp2": ("llama_tp2_x_2replicas_zero1",
                                              [[((0, 2), [(H0, 2), (H1, 1)]), ((2, 6), [(TP23, 3)])]],
                                              dict(num_microbatches=2, optimizer_sharding="zero1"))},
    # TP on the first stage -> TP on the second, at another cut.
    3: {"reshard_to_tp_on_the_other_stage": ("llama_tp2_stage_plus_tp1_stage",
                                             [[((0, 4), [(H2, 2)]), ((4, 6), [(TP01, 2)])]],
                                             dict(num_microbatches=3, schedule="1f1b"))},
}


def _config(name: str, workdir: Path, world: int) -> tuple:
    model, seq, replicas, plan_kw, cfg_kw = CONFIGS[world][name]
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    plan = hand_plan(cluster, cpu_cost_graph(model, seq), replicas, name=name, **plan_kw)
    if cfg_kw.get("dataset") == TOKENS_BIN:
        cfg_kw = {**cfg_kw, "dataset": str(workdir / "tokens.bin")}
    cfg = TrainConfig(steps=STEPS, out_dir=str(workdir / name / "out"), checkpoint_dir=str(workdir / name / "ckpt"),
                      checkpoint_every=STEPS, **cfg_kw)
    return plan, cfg


def _resumed_configs(cfg: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The same training stopped after RESUME_AT + 1 steps (checkpoint at RESUME_AT), then
    resumed up to STEPS, in a directory of its own."""
    base = Path(cfg.out_dir).parent / "resumed"
    common = dict(dtype=cfg.dtype, dataset=cfg.dataset, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                  checkpoint_dir=str(base / "ckpt"))
    first = TrainConfig(steps=RESUME_AT + 1, out_dir=str(base / "out"), checkpoint_every=RESUME_AT, **common)
    second = TrainConfig(steps=STEPS, out_dir=str(base / "out"), checkpoint_every=STEPS, resume=True, **common)
    return first, second


def _resharded(name: str, workdir: Path, world: int):
    source, replicas, plan_kw = RESHARDED[world][name]
    model, seq = CONFIGS[world][source][:2]
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    return source, hand_plan(cluster, cpu_cost_graph(model, seq), replicas, name=name, **plan_kw)


def worker(world: int, workdir: Path) -> None:
    """Runs under torchrun: train every configuration of this world size in turn (those
    in RESUMED also stopped and resumed)."""
    from hetalloc.plan import load_plan
    from runtime.train import train
    import torch.distributed as dist
    for name in CONFIGS[world]:
        _, cfg = _config(name, workdir, world)
        plan = load_plan(workdir / name / "plan.json")
        train(plan, cfg)
        if name in RESUMED:
            for part in _resumed_configs(cfg):
                train(plan, part)
    from runtime import checkpoint
    from runtime.train import Trainer
    for name in RESHARDED.get(world, {}):
        source, plan = _resharded(name, workdir, world)
        t = Trainer(plan, TrainConfig(steps=STEPS, dtype="float64", out_dir=str(workdir / name / "out"),
                                      checkpoint_dir=str(workdir / source / "ckpt"), resume=True))
        assert t.done == STEPS
        checkpoint.save(workdir / name / "ckpt", STEPS, t.rank, t.key, t.state, t.device, plan=plan)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["2ranks", "3ranks", "4ranks"])
def launch(request, tmp_path_factory):
    world = request.param
    workdir = tmp_path_factory.mktemp(f"equiv{world}")
    np.random.default_rng(0).integers(0, 256, 30_000).astype(np.uint16).tofile(workdir / "tokens.bin")
    for name in CONFIGS[world]:
        plan, _ = _config(name, workdir, world)
        (workdir / name).mkdir()
        plan.save(workdir / name / "plan.json")
    proc = torchrun(world, [str(world), str(workdir)], script=__file__)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return world, workdir


def _check(world: int, workdir: Path, name: str) -> dict:
    from runtime.reference import reference_run
    plan, cfg = _config(name, workdir, world)
    ref_val: dict[int, float] = {}
    ref_opt: dict[str, dict[str, torch.Tensor]] = {}
    ref_losses, ref_params = reference_run(plan, cfg, val_losses=ref_val, optimizer_state=ref_opt)
    got = losses(Path(cfg.out_dir))
    assert len(got) == STEPS
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(got, ref_losses))
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert set(val) == set(ref_val) == ({s for s in range(1, STEPS + 1) if s % cfg.eval_every == 0} | {STEPS}
                                        if cfg.eval_every else set())
    loss_err = max([loss_err] + [abs(val[s] - ref_val[s]) / ref_val[s] for s in val])
    ranks = checkpoint_params(Path(cfg.checkpoint_dir), STEPS)
    assert len(ranks) == world
    tensor_err, worst = max_relative_error(ranks, ref_params)
    model_err = global_relative_error(ranks, ref_params)
    print(f"{name}: loss {loss_err:.2e}  worst tensor {tensor_err:.2e} ({worst})  whole model {model_err:.2e}"
          + (f"  val_loss at steps {sorted(val)}" if val else ""))
    if name in RESUMED:
        # The checkpoints hold the optimizer state whole, by parameter name, whatever the
        # sharding: every rank's copy of every AdamW moment equals the reference's.
        opt_err = 0.0
        for rank in checkpoint_optimizer(Path(cfg.checkpoint_dir), STEPS):
            for n, st in rank.items():
                assert st.keys() == ref_opt[n].keys(), n
                for k in ("exp_avg", "exp_avg_sq"):
                    ref = ref_opt[n][k].double()
                    opt_err = max(opt_err, float((st[k].double() - ref).abs().max() / ref.abs().max()))
                assert float(st["step"]) == STEPS
        print(f"{name}: optimizer state worst tensor {opt_err:.2e}")
        assert opt_err <= 1e-9, (name, opt_err)
        # Stopped after step 3 and resumed from step 2: bit for bit the same.
        _, second = _resumed_configs(cfg)
        assert losses(Path(second.out_dir)) == got, name
        resumed = checkpoint_params(Path(second.checkpoint_dir), STEPS)
        assert len(resumed) == world and all(a.keys() == b.keys() for a, b in zip(resumed, ranks))
        assert all(torch.equal(a[n], b[n]) for a, b in zip(resumed, ranks) for n in a), name
    return {"loss": loss_err, "tensor": tensor_err, "worst": worst, "model": model_err, "cfg": cfg, "plan": plan}


@pytest.mark.slow
def test_every_configuration_matches_single_process(launch):
    world, workdir = launch
    for name in CONFIGS[world]:
        r = _check(world, workdir, name)
        if r["cfg"].dtype == "float64":
            assert r["loss"] <= 1e-9 and r["tensor"] <= 1e-9, (name, r["loss"], r["tensor"], r["worst"])
            continue
        assert r["loss"] <= 1e-5, name
        assert r["model"] <= 1e-5, name
        if r["plan"].optimizer == "sgd":
            assert r["tensor"] <= 1e-5, (name, r["worst"])
        else:  # fp32 AdamW: bounded by the round-off floor described in the module doc
            assert r["tensor"] <= 5e-3, (name, r["worst"])
    for name, (source, _, _) in RESHARDED.get(world, {}).items():
        _check_resharded(workdir / source / "ckpt", workdir / name / "ckpt", name)


def _check_resharded(saved: Path, again: Path, name: str) -> None:
    """Every parameter and optimizer state tensor of the plan that resumed, gathered from
    its shards again, equals the saved one bitwise (every copy of it)."""
    params_a, params_b = checkpoint_params(saved, STEPS), checkpoint_params(again, STEPS)
    opt_a, opt_b = checkpoint_optimizer(saved, STEPS), checkpoint_optimizer(again, STEPS)
    truth = {n: (t, opt[n]) for ps, opt in zip(params_a, opt_a) for n, t in ps.items()}
    assert {n for ps in params_b for n in ps} == set(truth), name
    compared = 0
    for ps, opt in zip(params_b, opt_b):
        for n, t in ps.items():
            assert torch.equal(t, truth[n][0]), (name, n)
            assert opt[n].keys() == truth[n][1].keys() == {"step", "exp_avg", "exp_avg_sq"}, (name, n)
            for k, v in opt[n].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(truth[n][1][k])), (name, n, k)
            compared += 1
    print(f"{name}: {compared} parameters with their AdamW state bitwise as saved")


if __name__ == "__main__":
    from runtime.train import exit_rank  # leave without interpreter finalization (see there)

    worker(int(sys.argv[1]), Path(sys.argv[2]))
    exit_rank(0)
