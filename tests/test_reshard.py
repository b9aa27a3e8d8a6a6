"""Resharding round trips (runtime.reshard): rank files saved under plan A load under a
plan B with other stage boundaries, widths, replicas and world size, and every parameter
and every optimizer state tensor arrives bitwise as saved. The ranks are built in this
process (real models, real AdamW, real rank files through checkpoint.rank_state and
read_rank_file); the multi-process path (a parameter-server plan's shards, under
torchrun) is in tests/test_adaptive_run.py."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from hetalloc.cluster import load_cluster
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
        state = checkpoint.rank_state(STEP, r, world, key, module, opt, torch.device("cpu"),
                                      next_sample=STEP * a.global_batch)
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
        assert checkpoint.restore(state, path, key, module, opt, torch.device("cpu")) == STEP
        for n, got in by_name(module, opt).items():
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
    ps.grad_sync = "param_server"  # sharded state: every holder of an overlapping layer
    assert reshard.source_ranks(ps, 0, 1) == [0, 1]


def test_sharded_optimizer_state_moves_between_shards_and_whole_parameters():
    """A parameter server's owners hold flat shards across parameters: w (3 x 4) and b (5)
    laid out in one bucket of 17, owner 0 elements [0, 9) (w's first 9), owner 1 [9, 17)
    (w's last 3, then b). Their pieces put together equal the state of whole w and b."""
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    flat = torch.cat([w.flatten(), b])
    grads = [torch.randn(17, dtype=torch.float64) for _ in range(2)]

    def adam(tensors, slices):
        opt = torch.optim.AdamW(tensors, lr=1e-2)
        for g in grads:
            for t, (lo, hi) in zip(tensors, slices):
                t.grad = g[lo:hi].clone().view(t.shape)
            opt.step()
        return opt

    s0, s1 = flat[:9].clone(), flat[9:].clone()
    sharded = [adam([s0], [(0, 9)]), adam([s1], [(9, 17)])]
    layouts = [[[("w", 0, 9, 0)]], [[("w", 9, 3, 0), ("b", 0, 5, 3)]]]
    pieces = [pc for o, lay in zip(sharded, layouts) for pc in reshard.portable_optimizer(o, lay)["pieces"]]
    hp = reshard.portable_optimizer(sharded[0], layouts[0])["hparams"]
    whole_w, whole_b = w.clone(), b.clone()
    whole = adam([whole_w, whole_b], [(0, 12), (12, 17)])  # the reference: the same steps on whole tensors
    fresh = torch.optim.AdamW([w.clone(), b.clone()], lr=1e-2)
    reshard.load_optimizer(fresh, [[("w", 0, 12, 0)], [("b", 0, 5, 0)]], {"hparams": hp, "pieces": pieces}, "test")
    for p_ref, p_new in zip(whole.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(whole.state[p_ref][k], fresh.state[p_new][k], rtol=0, atol=1e-15), k
    # ... and back: whole -> the other owner's shard, bitwise what the pieces held.
    back = torch.optim.AdamW([torch.zeros(8, dtype=torch.float64)], lr=1e-2)
    reshard.load_optimizer(back, layouts[1], {"hparams": hp, "pieces": pieces}, "test")
    st = back.state[back.param_groups[0]["params"][0]]
    assert torch.equal(st["exp_avg"], sharded[1].state[s1]["exp_avg"])
    # A piece missing: refused, saying which elements.
    with pytest.raises(Exception, match=r"no saved optimizer state for elements \[9, 12\) of w"):
        reshard.load_optimizer(back, layouts[1], {"hparams": hp, "pieces": pieces[:1]}, "test")
