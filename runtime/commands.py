"""``hetalloc run``: the CLI face of the runtime (wired into hetalloc/cli.py by its owner).

``register(subparsers)`` adds the subcommand; its handler launches torchrun on this
machine for a single-node plan, or prints one torchrun command per node for a
multi-node plan (or whenever ``--nodes-print`` is given). Errors are raised (HetallocError)
for the CLI to print. Never imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetalloc.errors import SpecError
from hetalloc.models import resolve_model
from hetalloc.plan import plan_context

from .config import TrainConfig
from .launch import DEFAULT_PORT, check_run, load_checked, node_commands, run_local, train_args
from .tokens import NAMED, check_dataset


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="train a plan with torchrun (pipeline + uneven data parallel), measured against its prediction",
        description="Train a plan with torchrun on this machine, or print the torchrun command of every node "
                    "for a multi-node plan. Rank 0 prints one line per step and, at the end, measured "
                    "times next to the plan's predictions (also in OUT/summary.json).")
    p.add_argument("plan", help="plan JSON written by 'hetalloc plan'")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--slowdown", action="append", metavar="RANK=FACTOR[@STEP]",
                   help="stretch a rank's (or device id's) compute time by FACTOR >= 1, to emulate a slower "
                        "device on a homogeneous machine (a test and what-if aid); @STEP: from that step on "
                        "(a factor of 1 ends it); repeatable")
    p.add_argument("--checkpoint-dir", metavar="D", help="directory for checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="save every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in D")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts after a failed rank; restarted ranks resume from the last checkpoint")
    p.add_argument("--out", default="out/run", metavar="DIR", help="metrics.jsonl and summary.json (default out/run)")
    p.add_argument("--dataset", default="synthetic", metavar="NAME|PATH",
                   help="'synthetic' (seeded tokens, default), 'text' (the shipped corpus, byte tokens), or a file: "
                        "text (byte tokens), .npy (1-D integer token ids) or .bin (raw uint16 token ids, the "
                        "nanoGPT/Megatron layout); memory-mapped, each rank reads only its samples")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of a dataset file's tokens (its end) kept for validation (default 0.1)")
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="validation loss (forward only, through the plan's pipeline) after every K-th step and "
                        "the last, logged as val_loss in OUT/metrics.jsonl (default 0: never)")
    p.add_argument("--eval-batches", type=int, default=1, metavar="N",
                   help="global batches of validation samples per evaluation (default 1)")
    p.add_argument("--model", help="model to build (default: the plan's model; or a Hugging Face config.json)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 AdamW, 0.05 SGD)")
    p.add_argument("--nodes-print", action="store_true", help="print the torchrun command of every node, do not run")
    p.add_argument("--master-addr", default="<address of node 0>", help="rendezvous host for printed commands")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT, help="rendezvous port for printed commands")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=handler)
    return p


def check_data(args: argparse.Namespace, plan) -> str:
    """Check --dataset and the evaluation flags before any rank starts (one-line errors);
    returns the dataset as the ranks get it (a file as an absolute path)."""
    try:
        TrainConfig(steps=args.steps, dataset=args.dataset, val_fraction=args.val_fraction,
                    eval_every=args.eval_every, eval_batches=args.eval_batches)
    except ValueError as e:
        raise SpecError("hetalloc run", "", str(e)) from None
    shape = resolve_model(args.model) if args.model else plan_context(plan, args.plan)[1].shape(args.plan)
    check_dataset(args.dataset, vocab=shape.vocab, seq_len=plan.seq_len, val_fraction=args.val_fraction,
                  classify=shape.family == "bert")
    return args.dataset if args.dataset in NAMED else str(Path(args.dataset).resolve())


def launch_extra(args: argparse.Namespace, plan) -> list[str]:
    """The runtime arguments of a run beside the plan, steps, files and model: the
    dataset and evaluation flags (checked first)."""
    dataset = check_data(args, plan)
    extra = ["--dataset", dataset, "--val-fraction", str(args.val_fraction), "--eval-every", str(args.eval_every),
             "--eval-batches", str(args.eval_batches)]
    if args.lr is not None:
        extra += ["--lr", str(args.lr)]
    return extra


def handler(args: argparse.Namespace) -> int:
    plan, rm = load_checked(args.plan)
    extra = launch_extra(args, plan)
    if args.nodes_print or len(rm.nodes) > 1:
        check_run(args.plan, steps=args.steps, slowdown=args.slowdown, checkpoint_dir=args.checkpoint_dir,
                  checkpoint_every=args.checkpoint_every, resume=args.resume, model=args.model, here=False)
        targs = train_args(args.plan, steps=args.steps, slowdown=args.slowdown, out_dir=args.out,
                           checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, extra=extra + (["--model", args.model] if args.model else []))
        cmds = node_commands(rm, targs, master_addr=args.master_addr, master_port=args.master_port,
                             max_restarts=args.max_restarts)
        print(f"{args.plan}: {rm.world_size} ranks on {len(rm.nodes)} node(s); run on each node:")
        for c in cmds:
            print(f"# node {c.node} (node rank {c.node_rank}, {c.nproc} processes)")
            print(c.shell())
        return 0
    summary = run_local(args.plan, steps=args.steps, slowdown=args.slowdown, out_dir=args.out,
                        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                        resume=args.resume, max_restarts=args.max_restarts, model=args.model, extra=extra)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "output"}, indent=2))
    return 0
