"""The allocator: an integer program (and the search around it) that splits a model over a
heterogeneous cluster, plus the baselines users would otherwise use. Never imports torch."""

from .api import make_plan
from .baselines import BASELINES, baseline_plan

__all__ = ["make_plan", "baseline_plan", "BASELINES"]
