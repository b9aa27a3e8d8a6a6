"""A rank's training state by whole-model parameter name, whole: what a checkpoint holds,
independent of the plan that wrote it (how layers were cut into stages, tensor-parallel
degrees, optimizer sharding).

- parameters: a tensor-parallel group gathers each parameter's shards
  (``runtime.tensor_parallel.whole_params``);
- optimizer state: per parameter name, its per-element tensors (AdamW's exp_avg and
  exp_avg_sq, SGD's momentum_buffer) whole, and its scalars (step). Where the optimizer
  steps flat bucket shards (zero1, parameter server), each shard's owner broadcasts its
  part to the bucket's other holders first, then the bucket is cut back into parameters;
  tensor-parallel shards are gathered like parameters. Loading reverses both steps, so a
  resume under the same plan restores every value bit for bit.

Every rank of the plan calls ``params`` / ``optimizer_state`` at the same point (they
contain collectives within tensor-parallel groups and gradient groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .grad_sync import GradSync
from .models import StageModule
from .tensor_parallel import load_whole_params, local, local_shard, whole_params, whole_tensor


SCALAR_KEYS = ("step",)
"""Optimizer state that is one value per parameter (AdamW's step); everything else
(exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer) has one value per element."""


def _per_element(key: str, value: Any) -> bool:
    return key not in SCALAR_KEYS and isinstance(value, torch.Tensor)


@dataclass
class StageState:
    module: StageModule
    optimizer: torch.optim.Optimizer
    sync: GradSync

    @property
    def _tp(self):
        return getattr(self.module, "tensor_parallel", None)

    def names(self) -> set[str]:
        return {name for name, _ in self.module.named_model_parameters()}

    # ---- parameters -------------------------------------------------------------------
    def params(self) -> dict[str, torch.Tensor]:
        return whole_params(self.module)

    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        load_whole_params(self.module, params)

    # ---- optimizer state --------------------------------------------------------------
    def _whole(self, p: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
        """The whole-model tensor of a per-element state shaped like p's local part."""
        if isinstance(p, DTensor):
            value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
        return whole_tensor(value, name, self._tp).cpu().clone()

    def optimizer_state(self) -> dict[str, Any]:
        """{"by_param": {name: {key: whole tensor or scalar}}, "hyper": group 0's hyperparameters}."""
        opt, named = self.optimizer, self.module.named_model_parameters()
        by_param: dict[str, dict[str, Any]] = {}
        tensors = [t for g in opt.param_groups for t in g["params"]]
        if not self.sync.steps_shards:
            for (name, p), t in zip(named, tensors):
                st = opt.state.get(t, {})
                by_param[name] = {k: self._whole(p, name, v) if _per_element(k, v) else _plain(v)
                                  for k, v in st.items()}
        else:
            owned = {(id(b), a): t for (b, a, _), t in zip(self.sync.owned_shards(), tensors)}
            names = {id(p): name for name, p in named}
            for b in self.sync.buckets:
                mine = [opt.state.get(owned[(id(b), a)], {}) for a, _, owner in b.shards if owner == self.sync.rank]
                keys = self._bucket_keys(b, mine)
                flat: dict[str, torch.Tensor] = {}
                scalars: dict[str, Any] = {}
                for k in keys:
                    if k in SCALAR_KEYS:  # the same on every shard (every shard steps every step)
                        first = b.shards[0][2]
                        value = opt.state[owned[(id(b), b.shards[0][0])]][k].clone() if first == self.sync.rank \
                            else torch.zeros((), dtype=torch.float32)
                        if b.group is not None:
                            dist.broadcast(value, src=first, group=b.group)
                        scalars[k] = value
                        continue
                    full = torch.zeros_like(b.param_flat)
                    for a, n, owner in b.shards:
                        if owner == self.sync.rank:
                            full[a:a + n].copy_(opt.state[owned[(id(b), a)]][k])
                        if b.group is not None:
                            dist.broadcast(full[a:a + n], src=owner, group=b.group)
                    flat[k] = full
                at = 0
                for p in b.params:
                    shard = local(p)
                    n = shard.numel()
                    entry: dict[str, Any] = {k: self._whole(p, names[id(p)], v[at:at + n].view_as(shard))
                                             for k, v in flat.items()}
                    entry.update({k: _plain(v) for k, v in scalars.items()})
                    by_param[names[id(p)]] = entry
                    at += n
        hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        return {"by_param": by_param, "hyper": hyper}

    def _bucket_keys(self, bucket, mine: list[dict[str, Any]]) -> list[str]:
        """The state keys of a bucket's shards, agreed by its holders (a holder may own no
        shard of a small bucket under the parameter server)."""
        keys = sorted({k for st in mine for k in st})
        if bucket.group is None:
            return keys
        every: list[Any] = [None] * len(bucket.ranks)
        dist.all_gather_object(every, keys, group=bucket.group)
        return sorted({k for ks in every for k in ks})

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Put a saved ``optimizer_state`` into this rank's optimizer (its shards)."""
        opt, named = self.optimizer, self.module.named_model_parameters()
        by_param = saved["by_param"]
        tensors = [t for g in opt.param_groups for t in g["params"]]
        state: dict[int, dict[str, Any]] = {}
        if not self.sync.steps_shards:
            for i, ((name, p), t) in enumerate(zip(named, tensors)):
                state[i] = {k: local_shard(p, name, v, self._tp).clone() if _per_element(k, v) else v
                            for k, v in by_param[name].items()}
        else:
            names = {id(p): name for name, p in named}
            for i, (b, a, n) in enumerate(self.sync.owned_shards()):
                first = by_param[names[id(b.params[0])]]
                st: dict[str, Any] = {}
                for k, v0 in first.items():
                    if k in SCALAR_KEYS or not isinstance(v0, torch.Tensor):
                        st[k] = v0
                        continue
                    full = torch.zeros_like(b.param_flat)
                    at = 0
                    for p in b.params:
                        shard = local(p)
                        full[at:at + shard.numel()].copy_(local_shard(p, names[id(p)], by_param[names[id(p)]][k],
                                                                      self._tp).flatten())
                        at += shard.numel()
                    st[k] = full[a:a + n].clone()
                state[i] = st
        groups = opt.state_dict()["param_groups"]
        groups = [{**saved["hyper"], "params": g["params"]} for g in groups]
        opt.load_state_dict({"state": state, "param_groups": groups})


def _plain(v: Any) -> Any:
    return v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
