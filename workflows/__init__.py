"""hetalloc workflows: what needs several subsystems at once.

The subsystems each depend only on the vocabulary below them (``hetalloc/``): the
allocator plans, the simulator plays a plan out, the runtime trains it. Whatever drives
two or more of them lives here, above them and beside the CLI, so that the arrows
between packages only point down:

- ``demo``: ``hetalloc demo``: plan GPT-2 on the built-in lab cluster, simulate it
  (and with ``--run``, the closed loop);
- ``loop``: the closed loop on this machine: profile -> plan -> simulate -> run, predicted
  next to measured (``hetalloc demo --run``, benchmarks/sim_accuracy.py);
- ``whatif``: running what-if scenarios: the old plan and a re-plan (allocator) of each
  scenario (simulator.scenarios), both simulated, with prices; ``commands``: the
  ``hetalloc whatif`` subcommand. The simulator does not call the allocator (why: the
  module doc of ``whatif``);
- ``adaptive``: ``hetalloc run --adaptive``: decide on the runtime's reports (re-balance
  shares, re-plan when it pays, plan around a lost rank) and relaunch; ``rebalance``:
  shares for measured speeds; ``episode``: the same decisions over simulated steps
  (``hetalloc whatif --straggler``);
- ``examples``: the example instances (cluster, model, batch; planner and baseline plans)
  that the simulator's agreement test and benchmark share.

Nothing in allocator/, simulator/ or runtime/ imports this package. Never imports torch
(profiles and runs are torchrun subprocesses).
"""
