"""hetalloc runtime: plans become training. The only package that imports torch.

Layout (a part is found by its name):
- ``train``: the torchrun entry point (``python -m runtime.train --plan plan.json``);
- ``config``: what a launch trains and for how long (``TrainConfig``), and ``--slowdown``;
- ``rankmap``: which rank serves which device of the plan, and launch checks;
- ``models``: Hugging Face (GPT-2, BERT, Llama/Mistral/Qwen2, OPT) / plain torch models
  cut at the cost graph's layers;
- ``datasets``: deterministic token data, train and validation, and each rank's shard of
  a global batch; ``tokens``: the token files behind them (text, .npy, .bin), checked;
- ``pipeline``: a stage's schedule (GPipe, 1F1B) with p2p between stages of any width;
- ``tensor_parallel``: a tensor-parallel group's stage sharded with DTensor (plan schema 2);
- ``grad_sync``: bucketed, overlapped gradient all-reduce / hierarchical / parameter server,
  per tensor-parallel slice, and zero1's reduce-scatter / all-gather;
- ``stage_state``: a rank's parameters and optimizer state by whole-model name (checkpoints);
- ``optim``, ``checkpoint``, ``metrics``: optimizers, atomic checkpoints, measurements;
- ``reshard``: checkpoints by whole-model name, put together for another plan;
- ``monitor``, ``adaptive``, ``control``: ``--adaptive`` ranks measure themselves against the
  plan, report stragglers and obey the workflow's commands (new shares, restart);
- ``launch``, ``commands``: torchrun commands and ``hetalloc run``;
- ``profile/``: ``hetalloc profile`` and its ranks (``python -m runtime.profile``): layer,
  optimizer and link measurements into a cost graph and cluster spec;
- ``torchrun``: torchrun whose rendezvous store listens on 127.0.0.1 or --master-addr only;
- ``reference``: single-process training, the computation every plan must reproduce;
- ``testing``: runs checked against the reference (tests and benchmarks);
- ``pipelining_ref``: torch.distributed.pipelining driven by hand (overhead benchmark);
- ``plans``: hand-written plans for tests and benchmarks.
The runtime imports only hetalloc/ (never the allocator or the simulator: what drives
several subsystems is in workflows/). Importing this package does not import torch
(``config``, ``launch``, ``commands``, ``plans``, ``rankmap``, ``tokens``,
``profile.command``, ``profile.files`` and ``profile.overhead`` are torch-free, so the CLI
can use them without it; so are ``control`` and ``monitor``).
"""
