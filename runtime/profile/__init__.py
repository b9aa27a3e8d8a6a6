"""Profiling: measure this machine's devices and links into what the planner reads.

- ``command``: ``hetalloc profile``: launches the ranks (torchrun), then the overhead
  runs and the calibration; torch-free;
- ``measure``: what every rank of ``torchrun -m runtime.profile`` does (``__main__``):
  how each figure is taken is its module doc;
- ``device``, ``layers``, ``links``: the measurements themselves (torch, ranks only):
  the device's name and memory; per-layer times, sizes, the optimizer step and matmul
  peak; p2p and all-reduce between ranks;
- ``files``: what a profile becomes: cost_graph.json, cluster.yaml, report.json;
  torch-free;
- ``overhead``: the runtime's own time per op and per step, from two short training
  runs; torch-free.
Importing this package does not import torch.
"""
