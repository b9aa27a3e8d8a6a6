"""hetalloc: plan, predict and run distributed training on heterogeneous GPU clusters.

This package is the shared vocabulary (cluster spec, cost graph, plan, cost formulas,
catalog) plus the CLI. Nothing here imports torch, the allocator or the simulator,
except ``hetalloc.cli`` which is the thin face over all of them.
"""

__version__ = "0.1.0"
