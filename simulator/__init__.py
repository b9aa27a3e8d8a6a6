"""The simulator: discrete-event (SimPy) prediction of training iterations of a plan on a
cluster, with shared links, overlap, collectives, memory, traces, plots and what-if
scenarios; measured speeds as derived device types (``speeds``) and many iterations under
a speed trace with failures (``episode``). Never imports torch."""

from .api import explain_difference, simulate
from .engine import SimOptions, Simulation
from .report import SimReport

__all__ = ["simulate", "explain_difference", "SimOptions", "Simulation", "SimReport"]
