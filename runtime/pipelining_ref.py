"""torch.distributed.pipelining driven by hand on a plan's stages, stepped in turn with
the runtime on the same stages: the comparison of the overhead benchmark.

    torchrun --nproc-per-node=S -m runtime.pipelining_ref --plan plan.json --steps N --out DIR

Each process builds the runtime (runtime.train.Trainer) and, from the same init, a
second copy of its stage driven by torch's ScheduleGPipe / Schedule1F1B with the same
data, loss and optimizer. Steps alternate between the two (runtime first on odd steps,
the reference first on even ones), so both see the same machine load: on a shared
machine, separate runs minutes apart differ by more than the effect being measured.
Plans with one replica and one group per stage, all groups of one size t (what
PipelineStage expresses: with t > 1, a (pipeline x tensor) mesh where rank k of every
stage's group forms pipeline k; the stage copy is sharded with DTensor by
runtime.tensor_parallel, its optimizer steps the local shards as the runtime's does).
Rank 0 writes DIR/summary.json (the runtime's usual summary) and
DIR/pipelining_ref.json (both engines' step times and losses).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import load_plan

from .config import TrainConfig
from .models import StageModule, build_model, token_loss_sum
from .optim import build_optimizer
from .rankmap import rank_map
from .tensor_parallel import local, parallelize_stage
from .train import Trainer, run_entry

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def run(plan_path: str, steps: int, out_dir: str) -> None:
    plan = load_plan(plan_path)
    stages = plan.replicas[0].stages
    if len(plan.replicas) != 1 or any(len(s.groups) != 1 for s in stages) or \
            len({s.groups[0].tp for s in stages}) != 1:
        raise SpecError(plan_path, "replicas", "the pipelining reference needs one replica with one group per "
                        "stage, all of one size", "use a plain pipeline plan")
    cfg = TrainConfig(steps=steps, out_dir=out_dir)
    trainer = Trainer(plan, cfg)
    role, device = trainer.role, trainer.device
    shape = trainer.cg.shape()
    rm = rank_map(plan, trainer.cluster)
    pipes = [dist.new_group([rm.rank_of(s.groups[0].devices[k]) for s in stages])
             for k in range(stages[0].groups[0].tp)]  # pipeline k: tensor-parallel rank k of every stage
    module = StageModule(build_model(shape, seed=cfg.seed), role.start, role.stop,
                         recompute=stages[role.stage].recompute == "full").to(device)
    if trainer.tp is not None:
        parallelize_stage(module, shape, trainer.tp.mesh, num_layers=trainer.cg.num_layers)
    stage = PipelineStage(module, role.stage, role.num_stages, device, group=pipes[role.tp_rank])

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) / labels.numel()  # mean; the schedule averages micro-batches

    sched = SCHEDULES[plan.schedule](stage, n_microbatches=plan.num_microbatches, loss_fn=loss_fn)
    params = list(module.parameters())
    shards = [local(p) for p in params]  # DTensor parameters: step their local shards, as the runtime does
    optimizer = build_optimizer(plan.optimizer, shards, cfg)
    B = plan.global_batch

    def reference_step(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        ids, labels = trainer.data.batch((step - 1) * B, B)
        module.zero_grad(set_to_none=True)
        optimizer.zero_grad()
        mb_losses: list[torch.Tensor] = []
        with trainer.loss_context():
            if role.is_first:
                sched.step(ids.to(device))
            elif role.is_last:
                sched.step(target=labels.to(device), losses=mb_losses)
            else:
                sched.step()
        for t, p in zip(shards, params):
            if t is not p:  # a gradient may come in another layout (the embedding's: replicated)
                g = p.grad if p.grad.placements == p.placements else p.grad.redistribute(p.device_mesh, p.placements)
                t.grad = local(g)
        optimizer.step()
        loss = torch.stack(mb_losses).mean().double().detach() if mb_losses and role.tp_rank == 0 \
            else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(loss)  # the same end-of-step sync as the runtime's
        return float(loss), time.perf_counter() - t0

    records, losses, ref_times, ref_losses = [], [], [], []
    for step in range(1, steps + 1):
        for engine in (("runtime", "reference") if step % 2 else ("reference", "runtime")):
            if engine == "runtime":
                loss, times = trainer.train_step(step)
                records.append(times)
                losses.append(loss)
            else:
                loss, dt = reference_step(step)
                ref_losses.append(loss)
                ref_times.append(dt)
        if trainer.rank == 0:
            print(f"step: {step:4d}  runtime: {records[-1].step_s:6.3f}s  pipelining: {ref_times[-1]:6.3f}s  "
                  f"loss: {losses[-1]:8.5f} / {ref_losses[-1]:8.5f}", flush=True)
    trainer.summarize(records, losses)
    if trainer.rank == 0:
        atomic_write_json(os.path.join(out_dir, "pipelining_ref.json"),
                          {"schedule": plan.schedule, "runtime_step_times_s": [r.step_s for r in records],
                           "pipelining_step_times_s": ref_times, "runtime_losses": losses,
                           "pipelining_losses": ref_losses})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.pipelining_ref", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="out/pipelining_ref")
    a = p.parse_args(argv)
    return run_entry(lambda: run(a.plan, a.steps, a.out))


if __name__ == "__main__":
    from runtime.train import exit_rank

    exit_rank(main())
