"""Entry point: train one plan with torchrun.

    torchrun --nproc-per-node=N -m runtime.train --plan plan.json [--model NAME] [--steps N] ...

(``hetalloc run plan.json`` builds this command for you.) Each process finds its device
from the plan (runtime.rankmap), builds its stage, and runs the plan's schedule
(runtime.pipeline), gradient sync (runtime.grad_sync) and optimizer for ``--steps``
steps. Only rank 0 prints: one line per step, and a summary of measured against
predicted times at the end (runtime.metrics).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from hetalloc.cluster import Cluster
from hetalloc.errors import HetallocError, SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.models import TransformerShape, resolve_model
from hetalloc.plan import Plan, load_plan, plan_context, validate_plan

from . import checkpoint, reshard, tensor_parallel
from .adaptive import AdaptiveRank, switched_executor
from .config import TrainConfig, check_slowdown, parse_slowdowns, slowdown_at
from .datasets import TokenDataset, device_samples
from .grad_sync import GradSync, ProcessGroups
from .launch import free_port
from .metrics import (MetricsWriter, StepTimes, build_summary, eval_line, mean_times, measured_records, step_line,
                      summary_table, times_from_record)
from .models import DTYPES, StageModule, build_model, layer_param_counts
from .optim import build_optimizer
from .pipeline import PipelineExecutor, stage_role
from .rankmap import LaunchInfo, check_launch, check_supported, rank_map
from .stage_state import StageState

@dataclass
class Runtime:
    """This process in the distributed job."""

    info: LaunchInfo
    device: torch.device
    backend: str


def setup(plan: Plan, cluster: Cluster, node: str | None = None) -> Runtime:
    """Check this launch against the plan, pick the device and backend, and join the
    process group (once per process; later plans reuse it)."""
    rm = rank_map(plan, cluster)
    info = check_launch(rm, os.environ, node)
    vendors = {cluster.dtype(d).vendor == "cpu" for d in rm.devices}
    if len(vendors) > 1:
        raise SpecError(plan.source or "plan", "replicas", "mixes CPU and GPU devices",
                        "plan CPU ranks and GPU ranks separately")
    if vendors == {True}:
        device, backend = torch.device("cpu"), "gloo"
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if info.local_rank >= count:
            raise SpecError(plan.source or "plan", f"device {info.device}",
                            f"is a {cluster.dtype(info.device).name} but torch sees {count} CUDA devices on this node",
                            "run on the plan's cluster, or plan for this machine (examples/cpu-4.yaml)")
        device, backend = torch.device("cuda", info.local_rank), "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _init_process_group(backend, info)
    return Runtime(info, device, backend)


def _init_process_group(backend: str, info: LaunchInfo) -> None:
    if "MASTER_ADDR" not in os.environ and info.world_size == 1:  # one process without torchrun: no socket
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=info.rank,
                                world_size=info.world_size)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The launcher's store, shared with the ranks and kept across restarts (--max-restarts;
        # runtime.torchrun's rendezvous works this way, so that no rank listens): without a
        # prefix per attempt, restarted ranks read the dead ranks' gloo addresses and fail to
        # connect (pytorch/pytorch#135712).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                              is_master=False)
        dist.init_process_group(backend, store=dist.PrefixStore(f"/hetalloc/attempt_{attempt}", store),
                                rank=info.rank, world_size=info.world_size)
    else:
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def check_model(shape: TransformerShape, plan: Plan, counts: list[int], cg_params: list[int]) -> list[str]:
    """The real model must have the cost graph's layers; parameter counts may differ a
    little (the analytic formulas round off biases), which is reported, not fatal."""
    if len(counts) != len(cg_params):
        raise SpecError("--model", "", f"'{shape.name}' has {len(counts)} layers, the plan's cost graph "
                        f"{len(cg_params)}", f"use the model the plan was made for ('{plan.model}')")
    diffs = [(i, a - b) for i, (a, b) in enumerate(zip(counts, cg_params)) if a != b]
    if not diffs:
        return []
    return [f"the model has {sum(counts):,} parameters, the cost graph counts {sum(cg_params):,} "
            f"(differences in layers {', '.join(f'{i}: {d:+,}' for i, d in diffs[:6])}"
            f"{', ...' if len(diffs) > 6 else ''})"]


def _slowdown_of(cfg: TrainConfig, info: LaunchInfo, cluster: Cluster) -> float:
    check_slowdown({**cfg.slowdown, **{k: 1.0 for k in cfg.slowdown_from}}, info.world_size, cluster.device_by_id)
    return cfg.slowdown.get(str(info.rank), cfg.slowdown.get(info.device, 1.0))


class Trainer:
    """One rank's training of one plan: built once, then stepped (``run`` does it all)."""

    def __init__(self, plan: Plan, cfg: TrainConfig, *, model: str | None = None, node: str | None = None):
        self.plan, self.cfg = plan, cfg
        self.cluster, self.cg = plan_context(plan)
        validate_plan(plan, self.cluster, self.cg)
        check_supported(plan)
        shape = resolve_model(model) if model else self.cg.shape()
        self.rt = rt = setup(plan, self.cluster, node)
        self.rank, self.device = rt.info.rank, rt.device
        dtype = DTYPES[cfg.dtype]
        rm = rank_map(plan, self.cluster)
        self.role = role = stage_role(plan, rm, self.rank)
        built = build_model(shape, seed=cfg.seed, dropout=cfg.dropout, dtype=dtype)
        self.model_notes = check_model(shape, plan, layer_param_counts(built), [l.params for l in self.cg.layers])
        stage = plan.replicas[role.replica].stages[role.stage]
        self.module = StageModule(built, role.start, role.stop, recompute=stage.recompute == "full").to(self.device)
        del built
        self.tp = tensor_parallel.setup_stage(plan, rm, role.tp_ranks, self.module, shape, self.device,
                                              self.cg.num_layers)
        groups = ProcessGroups(plan, rm, self.cluster, self.cg, plan.grad_sync)
        self.sync = GradSync(self.module, role, groups, self.rank, plan.grad_sync, cfg.bucket_cap_mb * 2**20,
                             zero1=plan.optimizer_sharding == "zero1",
                             layouts=tensor_parallel.param_layouts(self.module, shape.family, self.cg.num_layers))
        self.optimizer = build_optimizer(plan.optimizer, self.sync.optimizer_tensors(self.module), cfg)
        self.sync.before_launch = lambda: self.executor.hold()  # the executor may be switched later
        self.state = StageState(self.module, self.optimizer, self.sync)
        self.slowdown = _slowdown_of(cfg, rt.info, self.cluster)
        self.slowdown_changes = cfg.slowdown_from.get(str(self.rank), cfg.slowdown_from.get(rt.info.device, ()))
        self.executor = PipelineExecutor(role, self.module, plan.schedule, plan.num_microbatches,
                                         (plan.seq_len, shape.hidden), dtype, self.device,
                                         loss_scale=1.0 / (plan.global_batch * plan.seq_len), slowdown=self.slowdown)
        self.data = TokenDataset(cfg.dataset, vocab=shape.vocab, seq_len=plan.seq_len, seed=cfg.seed,
                                 classify=shape.family == "bert", val_fraction=cfg.val_fraction)
        self.key = checkpoint.plan_key(plan)
        self.done = 0
        """Steps completed before this launch (from a checkpoint)."""
        self.first_sample = 0
        """The first training sample of step done + 1 (the data position)."""
        self.last_saved = 0
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if cfg.checkpoint_dir and (cfg.resume or restarted):
            self._resume(rt.info.world_size)
        self.adaptive = AdaptiveRank(self) if cfg.adaptive else None

    def _resume(self, world_size: int) -> None:
        """Continue from the newest complete checkpoint, saved by this plan or another
        (runtime.reshard puts this rank's state together from the old ranks' files)."""
        cfg, role = self.cfg, self.role
        names = {n for n, _ in self.module.named_model_parameters()}
        load = reshard.loader(self.rank, self.key, world_size, role.start, role.stop, names)
        found = checkpoint.find_resume(cfg.checkpoint_dir, self.rank, world_size, self.key, load=load)
        if found.warning and self.rank == 0:
            print(f"warning: {found.warning}", file=sys.stderr, flush=True)
        if found.state is None:
            if self.rank == 0 and not found.warning:
                print(f"no checkpoint in {cfg.checkpoint_dir}; starting at step 1")
            return
        assert found.path is not None
        self.done = checkpoint.restore(found.state, found.path, self.key, self.state, self.device)
        self.first_sample = int(found.state.get("data", {}).get("next_sample", self.done * self.plan.global_batch))
        self.last_saved = self.done
        if self.rank == 0 and found.state.get("resharded_from"):
            print(f"resumed from step {self.done} saved by another plan ({found.state['resharded_from']}): "
                  f"resharded to this plan's {world_size} ranks, next sample {self.first_sample}", flush=True)

    def save_checkpoint(self, step: int) -> float:
        """Every rank: save step `step` (with the plan, the optimizer layout and the data
        position); returns the seconds it took."""
        if not self.cfg.checkpoint_dir:
            raise SpecError("--checkpoint-dir", "", "is needed to stop and restart under another plan",
                            "give a checkpoint directory")
        t0 = time.perf_counter()
        checkpoint.save(self.cfg.checkpoint_dir, step, self.rank, self.key, self.state, self.device,
                        plan=self.plan, next_sample=self.sample_of(step + 1))
        self.last_saved = step
        seconds = time.perf_counter() - t0
        if self.adaptive is not None:
            self.adaptive.checkpointed(step, seconds)
        return seconds

    def sample_of(self, step: int) -> int:
        """The first training sample of step `step` of this launch's plan."""
        return self.first_sample + (step - self.done - 1) * self.plan.global_batch

    def switch_shares(self, plan: Plan) -> None:
        """Another plan with the same stages and groups (runtime.control.same_layout)
        takes over before the next step: this rank's slice, its peers, the predictions."""
        self.plan = plan
        self.cluster, self.cg = plan_context(plan)
        self.role = stage_role(plan, rank_map(plan, self.cluster), self.rank)
        self.executor = switched_executor(self.executor, self.role)
        self.key = checkpoint.plan_key(plan)

    def _batch(self, base: int, split: str = "train") -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """This rank's inputs (first stage) and labels (last stage) of every micro-batch of
        the global batch that starts at sample `base` of `split`."""
        plan, role, M = self.plan, self.role, self.plan.num_microbatches
        inputs: list[torch.Tensor | None] = [None] * M
        labels: list[torch.Tensor | None] = [None] * M
        if role.is_first or role.is_last:
            for m in range(M):
                first, count = device_samples(plan, role.replica, role.stage, role.device_index, m)
                ids, lab = self.data.batch(base + first, count, split)
                inputs[m] = ids.to(self.device) if role.is_first else None
                labels[m] = lab.to(self.device) if role.is_last else None
        return inputs, labels

    def loss_context(self):
        """Around the stage's forwards and backwards: loss_parallel for a vocabulary-parallel head."""
        return self.tp.loss_context() if self.tp is not None else nullcontext()

    def train_step(self, step: int) -> tuple[float, StepTimes]:
        """One optimizer step (1-based step number); returns the global loss and the times."""
        times = StepTimes()
        t_step = time.perf_counter()
        inputs, labels = self._batch(self.sample_of(step))
        self.executor.slowdown = slowdown_at(self.slowdown, self.slowdown_changes, step)
        times.data_s = time.perf_counter() - t_step
        self.sync.zero_grad()
        with self.loss_context():
            loss = self.executor.run_step(inputs, labels, times, self.sync.arm)
        self.sync.finish(times)
        t0 = time.perf_counter()
        self.optimizer.step()
        self.sync.after_optimizer()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times.optimizer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dist.all_reduce(loss)
        loss_value = float(loss)
        times.loss_sync_s = time.perf_counter() - t0
        times.step_s = time.perf_counter() - t_step
        return loss_value, times

    def evaluate(self) -> tuple[float, float]:
        """Validation loss (mean over tokens) of cfg.eval_batches global batches of the
        validation split, forward only through this plan's pipeline; and its seconds."""
        t0 = time.perf_counter()
        B, K = self.plan.global_batch, self.cfg.eval_batches
        scale = 1.0 / (B * self.plan.seq_len * K)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        times = StepTimes()
        for k in range(K):
            inputs, labels = self._batch(k * B, "val")
            with self.loss_context():
                total += self.executor.run_forward(inputs, labels, times, scale)
        dist.all_reduce(total)
        return float(total), time.perf_counter() - t0

    def banner(self) -> str:
        plan, rt = self.plan, self.rt
        return (f"hetalloc runtime: {plan.model} ({plan.planner or 'hand-made'} plan) on {rt.info.world_size} ranks "
                f"({rt.backend}, {self.device.type}); {len(plan.replicas)} replica(s), schedule {plan.schedule}, "
                f"grad sync {plan.grad_sync}, {plan.optimizer}; global batch {plan.global_batch} in "
                f"{plan.num_microbatches} micro-batches; "
                + "".join(f"{option}; " for option in plan.options_used())
                + f"steps {self.done + 1}..{self.cfg.steps}")

    def run(self) -> dict[str, Any] | None:
        """Train up to cfg.steps; returns the summary on rank 0 (None elsewhere)."""
        cfg, plan, rank = self.cfg, self.plan, self.rank
        if rank == 0:
            print(self.banner(), flush=True)
            for note in self.model_notes:
                print(f"note: {note}")
        writer = MetricsWriter(cfg.out_dir, rank, resume_after=self.done, tensorboard=cfg.tensorboard)
        if self.adaptive is not None:
            self.adaptive.writer = writer
        past = [(int(r.get("launch_first_step", 1)), times_from_record(r)) for r in writer.rank_history]
        past_losses = [(int(r["step"]), float(r["loss"])) for r in writer.main_history if "loss" in r]
        records: list[StepTimes] = []
        losses: list[float] = []
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        for step in range(self.done + 1, cfg.steps + 1):
            if cfg.fail_at_step == step and cfg.fail_rank == rank and not restarted:
                os.kill(os.getpid(), 9)  # test aid: die like a crashed worker
            loss, times = self.train_step(step)
            samples_per_s = plan.global_batch / times.step_s
            extra = {}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss, eval_s = self.evaluate()
                extra = {"val_loss": val_loss, "eval_s": eval_s}
            writer.write(step, times, loss, samples_per_s, samples_per_s * plan.seq_len, extra)
            if rank == 0:
                print(step_line(step, loss, times.step_s, samples_per_s), flush=True)
                if extra:
                    print(eval_line(step, extra["val_loss"], extra["eval_s"]), flush=True)
            records.append(times)
            losses.append(loss)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self.save_checkpoint(step)
            if self.adaptive is not None and self.adaptive.after_step(step, times):
                break  # a restart under another plan: the workflow relaunches from this step
        writer.close()
        return self.summarize(records, losses, past=past, past_losses=past_losses)

    def summarize(self, records: list[StepTimes], losses: list[float], *,
                  past: list[tuple[int, StepTimes]] | None = None,
                  past_losses: list[tuple[int, float]] | None = None) -> dict[str, Any] | None:
        """Gather every rank's times; rank 0 writes summary.json, prints the table, returns it.
        records/losses: this launch's steps (from self.done + 1); past/past_losses: the
        steps before it, from this run's earlier launches (metrics files), as
        (launch_first_step, times) and (step, loss): the summary covers the whole run."""
        cfg, role = self.cfg, self.role
        past = past or []
        launches = past + [(self.done + 1, r) for r in records]
        measured = measured_records(launches, cfg.warmup_steps)
        mine = {"device": self.rt.info.device, "slowdown": self.slowdown,
                "role": {"replica": role.replica, "stage": role.stage, "share": role.share,
                         "layers": [role.start, role.stop]},
                "mean": mean_times(measured), "step_times_s": [r.step_s for r in measured]}
        gathered: list[Any] = [None] * self.rt.info.world_size
        dist.all_gather_object(gathered, mine)
        if self.rank != 0:
            return None
        past_losses = past_losses or []
        all_losses = [loss for _, loss in past_losses] + losses
        first_step = past_losses[0][0] if past_losses else self.done + 1
        summary = build_summary(self.plan, self.cluster, self.cg, gathered, all_losses, len(measured), first_step,
                                sorted({first for first, _ in launches}))
        summary["model_notes"] = self.model_notes
        atomic_write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(summary_table(summary), flush=True)
        return summary


def train(plan: Plan, cfg: TrainConfig, *, model: str | None = None, node: str | None = None) -> dict[str, Any] | None:
    """Train `plan` for cfg.steps steps; returns the summary on rank 0 (None elsewhere)."""
    return Trainer(plan, cfg, model=model, node=node).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="plan JSON written by 'hetalloc plan'")
    p.add_argument("--model", help="built-in model name or a Hugging Face config.json (default: the plan's model)")
    p.add_argument("--plan-node", help="the plan node this torchrun serves (checked against --node-rank)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps to reach")
    p.add_argument("--dataset", default="synthetic", metavar="NAME|PATH",
                   help="'synthetic' (seeded tokens), 'text' (the shipped corpus, byte tokens), or a file: text "
                        "(byte tokens), .npy (1-D integer token ids) or .bin (raw uint16 token ids, nanoGPT/Megatron)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of a dataset file's tokens (its end) kept for validation (default 0.1)")
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="validation loss after every K-th step and the last (0: never)")
    p.add_argument("--eval-batches", type=int, default=1, help="global batches per evaluation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the synthetic data")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 AdamW, 0.05 SGD)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 is for exactness checks on CPU")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="gradient bucket size, MiB")
    p.add_argument("--checkpoint-dir", help="directory for checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every K steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--out", default="out/run", help="directory for metrics.jsonl and summary.json")
    p.add_argument("--slowdown", action="append", metavar="RANK=FACTOR[@STEP]",
                   help="stretch a rank's (or device id's) compute by FACTOR >= 1: emulated heterogeneity; "
                        "@STEP: from that step on (a factor of 1 ends it)")
    p.add_argument("--adaptive", action="store_true",
                   help="monitor ranks against the plan, report stragglers and obey the workflow's commands "
                        "(hetalloc run --adaptive starts the workflow)")
    p.add_argument("--control-dir", help="the adaptive run's control directory (default OUT/control)")
    p.add_argument("--straggler-threshold", type=float, default=0.10,
                   help="relative departure from the predicted compute time that counts (default 0.10)")
    p.add_argument("--straggler-steps", type=int, default=3,
                   help="consecutive departing steps before a rank is reported (default 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="leading steps left out of the summary")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    p.add_argument("--fail-at-step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fail-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    slowdown, slowdown_from = parse_slowdowns(a.slowdown)
    return TrainConfig(steps=a.steps, dataset=a.dataset, val_fraction=a.val_fraction, eval_every=a.eval_every,
                       eval_batches=a.eval_batches, seed=a.seed, lr=a.lr, weight_decay=a.weight_decay,
                       momentum=a.momentum, dropout=a.dropout, dtype=a.dtype, bucket_cap_mb=a.bucket_cap_mb,
                       checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every, resume=a.resume,
                       out_dir=a.out, slowdown=slowdown, slowdown_from=slowdown_from, warmup_steps=a.warmup_steps,
                       tensorboard=a.tensorboard, fail_at_step=a.fail_at_step, fail_rank=a.fail_rank,
                       adaptive=a.adaptive, control_dir=a.control_dir, straggler_threshold=a.straggler_threshold,
                       straggler_steps=a.straggler_steps)


ERROR_GRACE_S = 5.0
"""How long a rank other than local rank 0 waits before it reports an error (see run_entry)."""


def run_entry(body: Callable[[], object]) -> int:
    """Run an entry point's body: a HetallocError becomes one line on stderr (said by local
    rank 0; another rank says its own after ERROR_GRACE_S if torchrun has not stopped it by
    then), and the process group is torn down whatever happens. Returns the exit code."""
    try:
        body()
    except HetallocError as e:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            # Errors found before training are the same on every rank: local rank 0 says it,
            # and torchrun stops this rank meanwhile. An error of this rank alone still shows.
            time.sleep(ERROR_GRACE_S)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_rank(code: int) -> None:
    """End a torchrun rank without interpreter finalization: gloo's worker threads can
    still hold work objects whose tensors reference Python, and tearing those down while
    the interpreter shuts down aborts the process now and then (SIGABRT, "terminate called
    without an active exception", after every step and file was complete; seen on about
    one run in fifteen here). Everything is written and the process group destroyed by
    then, so the streams are flushed and the process leaves at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        try:
            cfg = config_from_args(args)
        except SpecError:
            raise
        except ValueError as e:
            raise SpecError("arguments", "", str(e)) from None
        train(load_plan(args.plan), cfg, model=args.model, node=args.plan_node)

    return run_entry(body)


if __name__ == "__main__":
    exit_rank(main())
