"""allocator.milp on HiGHS: work limits, and a solve that does not depend on what other
HiGHS instances in the process did before it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from allocator.milp import Milp

ROOT = Path(__file__).resolve().parents[1]


def knapsack(n: int = 40) -> Milp:
    m = Milp()
    xs = [m.var(f"x{i}", 0, 3, True, obj=-float(7 + (i * 13) % 31)) for i in range(n)]
    for r in range(12):
        m.le({x: float(1 + (i * 7 + r * 5) % 17) for i, x in enumerate(xs)}, 150.0)
    return m


def test_a_work_limit_stops_the_solver_at_the_same_point_every_time():
    full = knapsack().solve(time_limit=60)
    assert full.status == "optimal" and full.checks > 5
    a = knapsack().solve(time_limit=60, work_limit=3 * full.nonzeros)
    b = knapsack().solve(time_limit=60, work_limit=3 * full.nonzeros)
    assert a.checks == b.checks == 3 and not a.time_hit
    assert (a.status, a.objective, a.bound) == (b.status, b.objective, b.bound)
    assert a.bound <= full.objective + 1e-9


def test_a_program_solves_after_highs_ran_on_more_threads_in_the_process():
    """HiGHS's thread scheduler is global: an instance on two threads first made every
    later single-threaded integer program fail to run (reported as 'no solution')."""
    code = textwrap.dedent("""
        import highspy, numpy as np
        from allocator.milp import Milp
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 2)
        h.addVars(1, np.array([0.0]), np.array([1.0]))
        h.changeColsCost(1, np.array([0], dtype=np.int32), np.array([1.0]))
        h.run()
        m = Milp()
        x = m.var("x", 0, 10, True, obj=-1.0)
        m.le({x: 1.0}, 3.5)
        r = m.solve(time_limit=10)
        print(r.status, r.objective)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["optimal", "-3.0"], out.stdout[-2000:]
