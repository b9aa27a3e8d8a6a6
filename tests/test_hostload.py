"""workflows.hostload: other processes' share of the host's CPU around a block."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from workflows.hostload import ForeignCpu

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


def test_a_busy_process_that_is_not_ours_counts_and_our_children_do_not():
    cores = len(os.sched_getaffinity(0))
    spin = [sys.executable, "-c", "import time\nt = time.time() + 1.5\nwhile time.time() < t: pass"]
    # a spinning process outside the block (started before it, reaped after it): one core
    # of the host's `cores` is someone else's for the whole block
    other = subprocess.Popen(spin)
    time.sleep(0.2)
    with ForeignCpu() as f:
        time.sleep(1.0)
    other.wait()
    assert f.share is not None and f.share >= 0.5 / cores  # at least half a core, however loaded
    # the same spin as a child waited for inside the block is ours: what is left is the
    # host's other load, a core less than in the first block
    with ForeignCpu() as g:
        subprocess.run(spin, check=True)
    assert g.share is not None and g.share < f.share
