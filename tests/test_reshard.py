"""Resharding round trips (runtime.reshard): rank files saved under plan A (checkpoint
format 3: parameters and optimizer state by whole-model name, whole) load under a plan B
with other stage boundaries, widths, replicas and world size, and every parameter and
every optimizer state tensor arrives bitwise as saved. The rank files are written here in
that format from real models and real AdamW steps and read back through
checkpoint.read_rank_file; the ranks' side (StageState cutting tensor-parallel and zero1
shards on load and gathering them again on save, under torchrun) is in
tests/test_runtime_equivalence.py (RESHARDED), the adaptive switches in
tests/test_adaptive_run.py.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest
import torch

from hetalloc.cluster import load_cluster
from hetalloc.errors import SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import Plan, plan_context
from runtime import checkpoint, reshard
from runtime.config import TrainConfig
from runtime.models import StageModule, build_model
from runtime.optim import build_optimizer
from runtime.pipeline import stage_role
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.rankmap import rank_map

ROOT = Path(__file__).resolve().parents[1]
H = [f"host/{i}" for i in range(4)]
STEP = 7


def plan(replicas, m: int = 2) -> Plan:
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    return hand_plan(cluster, cpu_cost_graph("gpt2-tiny", 16), replicas, num_microbatches=m)


PLAN_A = [[((0, 2), [(H[0], 2), (H[1], 2)]), ((2, 6), [(H[2], 4)])]]
PLANS_B = {
    "two ranks, another cut": [[((0, 4), [(H[3], 4)]), ((4, 6), [(H[1], 4)])]],
    "two replicas, four ranks": [[((0, 3), [(H[0], 1)]), ((3, 6), [(H[1], 1)])],
                                 [((0, 1), [(H[2], 3)]), ((1, 6), [(H[3], 3)])]],
    "one rank": [[((0, 6), [(H[2], 4)])]],
}


def rank(p: Plan, r: int) -> tuple[StageModule, torch.optim.Optimizer]:
    cluster, cg = plan_context(p)
    role = stage_role(p, rank_map(p, cluster), r)
    module = StageModule(build_model(cg.shape(), seed=0, dtype=torch.float64), role.start, role.stop)
    return module, build_optimizer("adamw", list(module.parameters()), TrainConfig())


def train_a_little(module: StageModule, optimizer: torch.optim.Optimizer) -> None:
    """Two AdamW steps with gradients that depend on the parameter's name only, so that
    the copies of a parameter on different ranks stay the same."""
    for k in range(2):
        for name, p in module.named_model_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + k)
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        optimizer.step()


def by_name(module: StageModule, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {"param": p.detach().clone(), **{k: v.clone() for k, v in optimizer.state[p].items()}}
            for n, p in module.named_model_parameters()}


def rank_file_state(r: int, world: int, key: str, module: StageModule, optimizer: torch.optim.Optimizer,
                    next_sample: int) -> dict:
    """A format-3 rank file's content, as runtime.stage_state gives it for a rank without
    sharding (every tensor whole, by parameter name)."""
    return {"format": checkpoint.FORMAT, "step": STEP, "rank": r, "world_size": world, "plan_key": key,
            "params": {n: p.detach().clone() for n, p in module.named_model_parameters()},
            "optimizer": {"by_param": {n: {k: v.clone() for k, v in optimizer.state[p].items()}
                                       for n, p in module.named_model_parameters()},
                          "hyper": {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}},
            "rng": {"torch": torch.get_rng_state()},
            "data": {"next_step": STEP + 1, "next_sample": next_sample}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Plan A's three ranks, trained two steps and saved at STEP as the runtime saves."""
    d = tmp_path_factory.mktemp("reshard")
    a = plan(PLAN_A)
    key, world = checkpoint.plan_key(a), 3
    truth: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(world):
        module, opt = rank(a, r)
        train_a_little(module, opt)
        truth.update(by_name(module, opt))
        state = rank_file_state(r, world, key, module, opt, STEP * a.global_batch)
        path = checkpoint.rank_file(d, STEP, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    atomic_write_json(checkpoint.step_dir(d, STEP) / reshard.PLAN_FILE, a.to_dict())
    return d, truth


@pytest.mark.parametrize("name", list(PLANS_B))
def test_parameters_and_optimizer_state_arrive_bitwise_under_another_plan(saved, name):
    d, truth = saved
    b = plan(PLANS_B[name])
    key, world = checkpoint.plan_key(b), len(b.device_ids())
    seen = set()
    for r in range(world):
        module, opt = rank(b, r)
        names = {n for n, _ in module.named_model_parameters()}
        state, path = reshard.loader(r, key, world, module.start, module.stop, names)(d, STEP)
        assert state["resharded_from"] != key and state["rng"] is None
        assert state["data"] == {"next_step": STEP + 1, "next_sample": STEP * 8}
        assert path == checkpoint.step_dir(d, STEP) and set(state["params"]) == names
        assert set(state["optimizer"]["by_param"]) == names
        for n in names:
            got = {"param": state["params"][n], **state["optimizer"]["by_param"][n]}
            assert got.keys() == truth[n].keys() == {"param", "step", "exp_avg", "exp_avg_sq"}
            for k, t in got.items():
                assert torch.equal(t, truth[n][k]), (n, k)
            seen.add(n)
    assert seen == set(truth)


def test_a_new_rank_reads_only_the_files_that_hold_its_layers():
    # Plan A: ranks 0 (host/0) and 1 (host/1) hold layers [0, 2), rank 2 (host/2) [2, 6).
    # With whole optimizer state one copy of each layer is enough: the largest overlap first.
    a = plan(PLAN_A)
    assert rank_map(a, plan_context(a)[0]).devices == (H[0], H[1], H[2])
    assert reshard.source_ranks(a, 0, 1) == [0]
    assert reshard.source_ranks(a, 1, 4) == [0, 2]
    assert reshard.source_ranks(a, 4, 6) == [2]
    ps = plan(PLAN_A)
    ps.grad_sync = "param_server"  # the files hold the state whole whatever the sharding: the same choice
    assert reshard.source_ranks(ps, 0, 1) == [0]


def test_the_plan_that_saved_reads_its_own_files_and_a_missing_plan_file_refuses_another_plan(saved, tmp_path):
    d, _ = saved
    a = plan(PLAN_A)
    state, path = reshard.loader(2, checkpoint.plan_key(a), 3, 2, 6, set())(d, STEP)
    assert path == checkpoint.rank_file(d, STEP, 2) and "resharded_from" not in state and state["rng"] is not None
    shutil.copytree(d, tmp_path / "old")
    (checkpoint.step_dir(tmp_path / "old", STEP) / reshard.PLAN_FILE).unlink()  # written before plans were kept
    b = plan(PLANS_B["one rank"])
    with pytest.raises(SpecError, match="plan_key: the checkpoint was written for another plan"):
        reshard.loader(0, checkpoint.plan_key(b), 1, 0, 6, set())(tmp_path / "old", STEP)
