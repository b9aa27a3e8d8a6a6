"""GPU runs (NCCL): the 2-stage and 2-replica equivalence checks on CUDA devices. Skipped
on machines without at least two CUDA devices (CI and the CPU development machines)."""

from __future__ import annotations


import pytest
import torch

from hetalloc.cluster import cluster_from_dict
from runtime.config import TrainConfig
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.testing import checkpoint_params, global_relative_error, losses, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices (NCCL); this machine has "
                                       f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")

GPUS = {"name": "two-gpus", "nodes": [{"gpus": [{"type": "A100-80G", "count": 2}], "intra_link": "NVLink3"}]}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("layout", ["two_stages", "two_replicas_3to1"])
def test_nccl_run_matches_single_process(tmp_path, schedule, layout):
    from runtime.reference import reference_run
    stages = {"two_stages": [[((0, 3), [("node0/0", 2)]), ((3, 6), [("node0/1", 2)])]],
              "two_replicas_3to1": [[((0, 6), [("node0/0", 3)])], [((0, 6), [("node0/1", 1)])]]}[layout]
    plan = hand_plan(cluster_from_dict(GPUS), cpu_cost_graph("gpt2-tiny", 32), stages, num_microbatches=4,
                     schedule=schedule)
    plan.save(tmp_path / "plan.json")
    proc = torchrun(2, ["--plan", str(tmp_path / "plan.json"), "--steps", "5", "--out", str(tmp_path / "out"),
                        "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "5"], timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref_losses, ref = reference_run(plan, TrainConfig(steps=5))  # CPU fp32: GPU kernels differ in round-off
    assert losses(tmp_path / "out") == pytest.approx(ref_losses, rel=1e-4)
    assert global_relative_error(checkpoint_params(tmp_path / "ckpt", 5), ref) <= 1e-4
