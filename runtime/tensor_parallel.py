"""Tensor parallelism of a stage: the t ranks of a plan group run their layers with
``torch.distributed.tensor.parallel`` (Megatron-LM's layout, as the cost graph prices it:
``hetalloc.models.layer_shapes``).

- blocks: the projections ``runtime.models.TENSOR_PARALLEL_PLAN`` names get
  ColwiseParallel (attention q/k/v, the MLP's first matmuls) or RowwiseParallel (the
  attention output, the MLP's last matmul): one all-reduce after each row-parallel
  matmul in the forward, one before each column-parallel one in the backward. Norms and
  the biases added after a row-parallel matmul stay whole on every rank.
- the token embedding: RowwiseParallel along the vocabulary (one all-reduce of its output);
- the LM head: ColwiseParallel along the vocabulary with the logits left sharded, and the
  loss computed on them by ``loss_parallel`` (one all-reduce of the input gradient in the
  backward, a few per-token ones in the loss); a classification head stays whole.

Every rank of a group holds the full activations at a stage boundary (and the full
input gradients), so pipeline sends need no gathering (``hetalloc.evaluate.rank_pairs``
says who sends to whom).

GPT-2's ``Conv1D`` (weights stored transposed; one fused q/k/v matrix) gets styles of its
own: the same placements on the transposed dimension, and for the fused ``c_attn`` a
head-aligned column order, so rank k's contiguous shard is [q_k, k_k, v_k] (its own
heads); ``attn.split_size`` becomes the local width. OPT's attention reshapes with its
head count, which becomes the local one.

Parameters keep their whole-model names; ``whole_tensor`` / ``local_shard`` convert a
parameter between its whole-model tensor (checkpoints) and this rank's shard.

Never imports allocator/ or simulator/; the plan decides groups, this module only shards.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from hetalloc.errors import SpecError
from hetalloc.models import TransformerShape
from hetalloc.plan import Plan

from .models import TENSOR_PARALLEL_PLAN, StageModule
from .rankmap import RankMap


# ---- process groups ----------------------------------------------------------------------

def tp_process_groups(plan: Plan, rm: RankMap) -> dict[tuple[int, ...], object]:
    """One process group per tensor-parallel group of the plan (ranks in the group's device
    order), created on every rank in plan order (torch needs every rank to take part)."""
    out: dict[tuple[int, ...], object] = {}
    for r in plan.replicas:
        for s in r.stages:
            for g in s.groups:
                if g.tp > 1:
                    ranks = tuple(rm.rank_of(d) for d in g.devices)
                    out[ranks] = dist.new_group(list(ranks))
    return out


# ---- local tensors of (possibly distributed) parameters ------------------------------------

def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or gradient (the tensor itself when not distributed)."""
    return p._local_tensor if isinstance(p, DTensor) else p


def set_local(p: nn.Parameter, data: torch.Tensor, grad: torch.Tensor) -> None:
    """Make `data` and `grad` (same shape as this rank's part) the storage of parameter p and
    of its gradient: gradients then accumulate into `grad` in place. For a distributed
    parameter the local tensor is swapped under the DTensor, as FSDP2 does with its flat
    shards."""
    if isinstance(p, DTensor):
        p._local_tensor = data
        p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride())
    else:
        p.data = data
        p.grad = grad


# ---- Conv1D (GPT-2) ------------------------------------------------------------------------

def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def head_aligned(x: torch.Tensor, dim: int, parts: int, t: int) -> torch.Tensor:
    """Reorder `parts` fused blocks along `dim` ([q | k | v], each of width n) so that
    chunk k of t is [q_k | k_k | v_k]: (parts, t, n/t) -> (t, parts, n/t)."""
    if parts == 1 or t == 1:
        return x
    n = x.shape[dim] // parts
    shape = x.shape[:dim] + (parts, t, n // t) + x.shape[dim + 1:]
    return x.reshape(shape).transpose(dim, dim + 1).reshape(x.shape)


def fused_order(x: torch.Tensor, dim: int, parts: int, t: int) -> torch.Tensor:
    """The inverse of ``head_aligned``: (t, parts, n/t) -> (parts, t, n/t)."""
    if parts == 1 or t == 1:
        return x
    n = x.shape[dim] // parts
    shape = x.shape[:dim] + (t, parts, n // t) + x.shape[dim + 1:]
    return x.reshape(shape).transpose(dim, dim + 1).reshape(x.shape)


class Conv1DColwise(ColwiseParallel):
    """ColwiseParallel for Hugging Face Conv1D (weight (in, out): sharded on dim 1, bias on
    dim 0); ``fused`` > 1 for a fused projection whose columns are reordered head-aligned."""

    def __init__(self, fused: int = 1):
        super().__init__()
        self.fused = fused

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        t, fused = device_mesh.size(), self.fused

        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                dim = 1 if pname == "weight" else 0
                whole = head_aligned(param.detach(), dim, fused, t)
                shards = distribute_tensor(whole, mesh, [Shard(dim)], src_data_rank=None)
                mod.register_parameter(pname, nn.Parameter(shards, requires_grad=param.requires_grad))

        return distribute_module(module, device_mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Conv1DRowwise(RowwiseParallel):
    """RowwiseParallel for Hugging Face Conv1D: weight sharded on dim 0, bias whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                place = [Shard(0)] if pname == "weight" else [Replicate()]
                mod.register_parameter(pname, nn.Parameter(
                    distribute_tensor(param.detach(), mesh, place, src_data_rank=None),
                    requires_grad=param.requires_grad))

        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, device_mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _style(kind: str, module: nn.Module):
    conv = _is_conv1d(module)
    if kind == "colwise":
        style = Conv1DColwise() if conv else ColwiseParallel()
    elif kind == "colwise_qkv":
        style = Conv1DColwise(fused=3) if conv else ColwiseParallel()
    elif kind == "rowwise":
        style = Conv1DRowwise() if conv else RowwiseParallel()
    else:
        raise ValueError(f"unknown tensor-parallel style '{kind}'")
    style.src_data_rank = None  # every rank built the same whole model: shard locally, no scatter
    return style


# ---- a stage --------------------------------------------------------------------------------

@dataclass
class TensorParallel:
    """What one rank of a tensor-parallel group needs besides its module."""

    mesh: DeviceMesh
    rank: int
    """Position in the group (``Group.devices`` order)."""
    size: int
    fused: dict[str, int] = field(default_factory=dict)
    """Whole-model names of parameters kept in head-aligned order -> fused blocks (3)."""
    vocab_parallel_head: bool = False
    """The stage's LM head leaves its logits sharded: the loss runs under loss_parallel."""

    def loss_context(self) -> AbstractContextManager:
        """Around every forward and backward of the stage (the sharded logits' loss)."""
        return loss_parallel() if self.vocab_parallel_head else nullcontext()


def check_divisible(shape: TransformerShape, t: int, source: str) -> None:
    """The split dimensions must divide by t (the planner's cost graph assumes it too)."""
    kv = shape.kv_heads or shape.heads
    dims = [("FFN width", shape.ffn)]
    if shape.family != "mlp":  # its blocks have no attention
        dims = [("attention heads", shape.heads), ("key/value heads", kv)] + dims
    for what, n in dims:
        if n % t:
            raise SpecError(source, "groups", f"{shape.name} has {n} {what}, which a tensor-parallel group of {t} "
                            "cannot split evenly", f"use groups whose size divides {n}")


def _embedding_target(family: str, layer: nn.Module) -> nn.Module | None:
    if family in ("llama", "mlp"):
        return layer
    if family == "gpt":
        return layer.wte
    if family == "opt":
        return layer.embed_tokens
    if family == "bert":
        return layer.embeddings.word_embeddings
    return None


def _head_target(family: str, layer: nn.Module) -> nn.Module | None:
    if family == "mlp":
        return layer
    if family in ("gpt", "llama", "opt"):
        return layer[len(layer) - 1]  # nn.Sequential(..., lm_head)
    return None  # BERT's classification head stays whole (the cost graph keeps it whole)


def tp_targets(module: StageModule, family: str, num_layers: int) -> list[tuple[nn.Module, str]]:
    """The stage's submodules that tensor parallelism splits, with their kind: 'embedding'
    (RowwiseParallel along the vocabulary), 'head' (ColwiseParallel along the vocabulary),
    or a block projection's TENSOR_PARALLEL_PLAN style."""
    out: list[tuple[nn.Module, str]] = []
    for i, layer in zip(range(module.start, module.stop), module.layers):
        if i == 0:
            target = _embedding_target(family, layer)
            out += [(target, "embedding")] if target is not None else []
        elif i == num_layers - 1:
            target = _head_target(family, layer)
            out += [(target, "head")] if target is not None else []
        else:
            block = layer.block if hasattr(layer, "block") else layer
            out += [(block.get_submodule(name), kind) for name, kind in TENSOR_PARALLEL_PLAN[family].items()]
    return out


Layout = tuple[int, int]
"""(dimension split, fused blocks) of a parameter under tensor parallelism; absent: whole."""


def param_layouts(module: StageModule, family: str, num_layers: int) -> dict[str, Layout]:
    """Whole-model name -> how tensor parallelism splits that parameter (the same whether or
    not this stage is split: a stage of one device reduces slices of its whole parameters
    with tensor-parallel ranks of other groups)."""
    out: dict[str, Layout] = {}
    for target, kind in tp_targets(module, family, num_layers):
        conv = _is_conv1d(target)
        for pname, p in target.named_parameters(recurse=False):
            if kind in ("embedding", "head"):
                dim = 0
            elif kind.startswith("colwise"):
                dim = 1 if conv and pname == "weight" else 0
            else:  # rowwise: the bias is added after the all-reduce, whole
                dim = (0 if conv else 1) if pname == "weight" else None
            if dim is not None:
                out[module.param_names[id(p)]] = (dim, 3 if kind == "colwise_qkv" and conv else 1)
    return out


def _piece_view(x: torch.Tensor, layout: Layout, parts: int, index: int) -> torch.Tensor:
    dim, fused = layout
    if fused == 1:  # torch.chunk, as DTensor shards (the last slices smaller when uneven)
        return torch.chunk(x, parts, dim=dim)[index]
    n = x.shape[dim]
    if n % (fused * parts):
        raise ValueError(f"fused blocks of {n} do not split into {parts} slices")
    shape = x.shape[:dim] + (fused, parts, n // (fused * parts)) + x.shape[dim + 1:]
    return x.view(shape).select(dim + 1, index)


def get_slice(x: torch.Tensor, layout: Layout | None, parts: int, index: int) -> torch.Tensor:
    """Slice `index` of `parts` of a (contiguous) tensor holding a parameter or its part, in
    the parameter's split layout (head-aligned for fused blocks), shaped as that
    parameter's shard; a whole parameter's (no layout) is the tensor itself. Slice j of t of
    a whole tensor is what tensor-parallel rank j of t holds; when t * m divides the split
    dimension, slice q of m of rank k's part is slice k * m + q of t * m of the whole."""
    if layout is None or parts == 1:
        return x
    view = _piece_view(x, layout, parts, index)
    if layout[1] == 1:
        return view
    dim = layout[0]
    return view.reshape(x.shape[:dim] + (x.shape[dim] // parts,) + x.shape[dim + 1:])


def set_slice(x: torch.Tensor, layout: Layout | None, parts: int, index: int, value: torch.Tensor) -> None:
    """Write `value` (shaped as ``get_slice`` returns it) into that slice of x, in place."""
    if layout is None or parts == 1:
        x.copy_(value)
        return
    view = _piece_view(x, layout, parts, index)
    view.copy_(value.view(view.shape))


def check_slices(x: torch.Tensor, layout: Layout | None, parts: int, name: str) -> None:
    """A part of a parameter held by a group of t > 1 can be cut into `parts` further slices
    that match a larger group's shards only if t * parts divides the split dimension."""
    if layout is not None and x.shape[layout[0]] % (layout[1] * parts):
        raise SpecError("plan", "groups", f"{name}: {x.shape[layout[0]]} rows or columns per rank do not split "
                        f"evenly into {parts} slices for the larger tensor-parallel groups that hold the same layers",
                        "give the groups that hold the same layers one size")


def parallelize_stage(module: StageModule, shape: TransformerShape, mesh: DeviceMesh, *,
                      num_layers: int, source: str = "plan") -> TensorParallel:
    """Shard `module` (layers [start, stop) of a model with `num_layers` cost-graph layers)
    over `mesh`, in place. Parameters keep their whole-model names. `source` names the
    plan in errors."""
    family, t = shape.family, mesh.size()
    check_divisible(shape, t, source)
    paths = {path: module.param_names[id(p)] for path, p in module.layers.named_parameters()}
    tp = TensorParallel(mesh, mesh.get_local_rank(), t)
    for name, (_, fused) in param_layouts(module, family, num_layers).items():
        if fused > 1:
            tp.fused[name] = fused
    for target, kind in tp_targets(module, family, num_layers):
        if kind == "embedding":
            parallelize_module(target, mesh, RowwiseParallel(input_layouts=Replicate()), src_data_rank=None)
        elif kind == "head":
            parallelize_module(target, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
                               src_data_rank=None)
            tp.vocab_parallel_head = True
        else:
            parallelize_module(target, mesh, _style(kind, target))
    for layer in module.layers:
        if hasattr(layer, "block"):
            _localize(family, layer.block, shape, t)
    module.param_names = {id(p): paths[path] for path, p in module.layers.named_parameters()}
    return tp


def _localize(family: str, block: nn.Module, shape: TransformerShape, t: int) -> None:
    """Attention attributes that must be the local ones (see module doc)."""
    if family == "gpt":
        block.attn.split_size = shape.hidden // t
    elif family == "opt":
        block.self_attn.num_heads = shape.heads // t


# ---- whole-model tensors ---------------------------------------------------------------------

def whole_tensor(p: torch.Tensor, name: str, tp: TensorParallel | None) -> torch.Tensor:
    """The whole-model tensor of parameter p (a collective over the group when it is
    distributed: every rank of the group calls it, in the same order)."""
    if not isinstance(p, DTensor):
        return p.detach()
    full = p.detach().full_tensor()
    parts = tp.fused.get(name, 1) if tp else 1
    if parts > 1:
        dim = p.placements[0].dim
        full = fused_order(full, dim, parts, p.device_mesh.size())
    return full


def local_shard(p: torch.Tensor, name: str, whole: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """This rank's part of the whole-model tensor `whole` of parameter p."""
    if not isinstance(p, DTensor):
        return whole
    place = p.placements[0]
    if isinstance(place, Replicate):
        return whole
    t = p.device_mesh.size()
    parts = tp.fused.get(name, 1) if tp else 1
    x = head_aligned(whole, place.dim, parts, t)
    return torch.chunk(x, t, dim=place.dim)[p.device_mesh.get_local_rank()]


# ---- a rank's stage -------------------------------------------------------------------------

def setup_stage(plan: Plan, rm: RankMap, tp_ranks: tuple[int, ...], module: StageModule, shape: TransformerShape,
                device: torch.device, num_layers: int) -> TensorParallel | None:
    """Every rank calls this (it creates every group's process group); the ranks of a
    tensor-parallel group (`tp_ranks`, in device order; empty when alone) shard their
    stage. The module remembers its TensorParallel (``module.tensor_parallel``)."""
    groups = tp_process_groups(plan, rm)
    if not tp_ranks:
        return None
    mesh = DeviceMesh.from_group(groups[tp_ranks], device.type)
    tp = parallelize_stage(module, shape, mesh, num_layers=num_layers, source=plan.source or "plan")
    module.tensor_parallel = tp
    return tp


def whole_params(module: StageModule) -> dict[str, torch.Tensor]:
    """The stage's parameters by whole-model name, whole (gathered parameter by parameter
    in a tensor-parallel group: every rank of the group calls this), on the CPU."""
    tp = getattr(module, "tensor_parallel", None)
    return {name: whole_tensor(p, name, tp).cpu().clone() for name, p in module.named_model_parameters()}


def load_whole_params(module: StageModule, params: dict[str, torch.Tensor]) -> None:
    """Put whole-model tensors (by whole-model name) into this rank's parameters (its
    shards), in place: parameters are views into gradient buckets."""
    tp = getattr(module, "tensor_parallel", None)
    with torch.no_grad():
        for name, p in module.named_model_parameters():
            local(p).copy_(local_shard(p, name, params[name], tp))
