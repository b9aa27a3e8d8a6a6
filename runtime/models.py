"""Real torch models, cut at the cost graph's layer boundaries.

A model is built whole from a ``hetalloc.models.TransformerShape`` (random init from a
seed, no download): from the Hugging Face config.json it came from, when it did, or
from a config made of the shape's fields (built-in models). It is cut into the layers
the cost graph lists: ``embedding``, ``block`` x n_layers, ``head``. Each layer is a
small module that owns exactly that layer's parameters, so a stage that holds layers
[start, stop) owns exactly their parameters. Parameters keep their names in the whole
model (``model.layers.3.mlp.up_proj.weight``), so checkpoints and comparisons do not
depend on how a plan cut the model.

Families (``hetalloc.models``): 'gpt' (GPT2LMHeadModel), 'llama' (LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM), 'opt' (OPTForCausalLM), 'bert'
(BertForTokenClassification without pooler), 'mlp' (plain torch: embedding, residual
MLP blocks, linear head; for fast tests). Every Hugging Face model is built with SDPA
attention, no KV cache, an LM head untied from the embedding (as the cost graph counts
it) and the run's dropout (0 by default, overriding the config's). Blocks are called one
by one on hidden states alone: with no mask, SDPA applies the causal mask itself; a
sliding-window layer (Mistral, Qwen2) whose window is shorter than the sequence gets
the window mask from ``DecoderPositions``, which also holds the rotary cos/sin. Those
are recomputed on each stage that holds blocks (once per sequence length), so nothing
but hidden states crosses a stage boundary.

The loss is the summed token cross-entropy; callers divide by the number of tokens of
the whole global batch, which makes every device's gradient carry its share's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hetalloc.errors import SpecError
from hetalloc.models import TransformerShape

from .config import FAMILIES  # defined without torch: the launcher checks --model with it

DTYPES = {"float32": torch.float32, "float64": torch.float64}
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertForTokenClassification", "llama": "LlamaForCausalLM",
              "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}

TENSOR_PARALLEL_PLAN: dict[str, dict[str, str]] = {
    "llama": {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"},
    "gpt": {"attn.c_attn": "colwise_qkv", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
    "opt": {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
            "self_attn.out_proj": "rowwise", "fc1": "colwise", "fc2": "rowwise"},
    "bert": {"attention.self.query": "colwise", "attention.self.key": "colwise", "attention.self.value": "colwise",
             "attention.output.dense": "rowwise", "intermediate.dense": "colwise", "output.dense": "rowwise"},
    "mlp": {"fc_in": "colwise", "fc_out": "rowwise"},
}
"""Per family, the projections of a block (``StageModule.blocks()``, relative names) and
their tensor-parallel style, as ``torch.distributed.tensor.parallel``'s ColwiseParallel /
RowwiseParallel take them ('colwise_qkv': GPT-2's fused q/k/v Conv1D, split by heads;
runtime.tensor_parallel applies them). ../shared/FACTS.md: works on gloo for HF Llama
blocks, the attention's view(..., -1, head_dim) follows the local head count."""


# ---- layers ----------------------------------------------------------------------------

class GPTEmbedding(nn.Module):
    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions)[None])


class OPTEmbedding(nn.Module):
    """Token embedding (projected to the hidden size when narrower) plus learned positions
    (OPT's table is offset by 2 rows), as OPTDecoder computes them without padding."""

    def __init__(self, embed_tokens: nn.Embedding, embed_positions: nn.Embedding, project_in: nn.Module | None):
        super().__init__()
        self.embed_tokens, self.embed_positions, self.project_in = embed_tokens, embed_positions, project_in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return x + self.embed_positions(None, 0, position_ids=positions)


class DecoderPositions(nn.Module):
    """What a Llama-shaped block needs besides hidden states: position ids, the rotary
    (cos, sin) and, for a sliding-window layer shorter than the sequence, its mask.
    Computed on first use per (sequence length, device, dtype, window) and kept: they
    depend on nothing else, and carry no gradient (the rotary frequencies are a buffer)."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary
        self._cache: dict[tuple, dict[str, Any]] = {}

    def forward(self, hidden: torch.Tensor, window: int | None) -> dict[str, Any]:
        T = hidden.shape[1]
        key = (T, hidden.device, hidden.dtype, window)
        hit = self._cache.get(key)
        if hit is None:
            pos = torch.arange(T, device=hidden.device)[None]
            with torch.no_grad():
                cos, sin = self.rotary(hidden, pos)
            mask = None  # SDPA's own causal mask
            if window is not None and T > window:
                i = torch.arange(T, device=hidden.device)
                allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
                mask = allowed[None, None]  # (1, 1, T, T), True = attend (transformers' sliding overlay)
            hit = self._cache[key] = {"position_ids": pos, "position_embeddings": (cos, sin), "attention_mask": mask}
        return hit


class Block(nn.Module):
    """A Hugging Face transformer block called on hidden states alone (no cache); a
    Llama-shaped block also gets positions and its mask from the shared DecoderPositions."""

    def __init__(self, block: nn.Module, positions: DecoderPositions | None = None, window: int | None = None):
        super().__init__()
        self.block = block
        self.positions = positions
        self.window = window

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kwargs = self.positions(hidden, self.window) if self.positions is not None else {}
        out = self.block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class BertEmbedding(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids)


class BertHead(nn.Module):
    def __init__(self, dropout: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.dropout, self.classifier = dropout, classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class MLPBlock(nn.Module):
    """x + W2 gelu(W1 x): the 'mlp' family's block (2hf + f + h parameters)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden, ffn)
        self.fc_out = nn.Linear(ffn, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.fc_out(F.gelu(self.fc_in(hidden)))


class MLPModel(nn.Module):
    """Token embedding, residual MLP blocks, linear head: a model whose cut is trivial."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.blocks = nn.ModuleList(MLPBlock(shape.hidden, shape.ffn) for _ in range(shape.n_layers))
        self.head = nn.Linear(shape.hidden, shape.vocab)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


# ---- building --------------------------------------------------------------------------

@dataclass
class BuiltModel:
    """A whole model and its cut: layers[i] is cost-graph layer i."""

    shape: TransformerShape
    model: nn.Module
    layers: list[nn.Module]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The whole model's own forward (the single-device reference)."""
        out = self.model(input_ids=input_ids) if self.shape.family != "mlp" else self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out

    def param_names(self) -> dict[int, str]:
        """id(parameter) -> its name in the whole model."""
        return {id(p): n for n, p in self.model.named_parameters()}


def hf_config_dict(shape: TransformerShape) -> dict[str, Any]:
    """The Hugging Face config of a shape: its config.json when it came from one, else
    one written from its fields (built-in models)."""
    if shape.hf_config is not None:
        return dict(shape.hf_config)
    if shape.family == "gpt":
        return {"model_type": "gpt2", "vocab_size": shape.vocab, "n_positions": shape.max_seq,
                "n_embd": shape.hidden, "n_layer": shape.n_layers, "n_head": shape.heads, "n_inner": shape.ffn,
                "bos_token_id": None, "eos_token_id": None}
    if shape.family == "bert":
        return {"model_type": "bert", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
                "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.heads,
                "intermediate_size": shape.ffn, "max_position_embeddings": shape.max_seq,
                "num_labels": shape.num_labels, "pad_token_id": 0}
    if shape.family == "llama":
        if shape.qkv_bias and not shape.out_bias and not shape.mlp_bias:
            mt, bias = "qwen2", {}
        elif shape.qkv_bias == shape.out_bias:
            mt, bias = "llama", {"attention_bias": shape.qkv_bias, "mlp_bias": shape.mlp_bias}
        else:
            raise SpecError("--model", shape.name, "has an output-projection bias without q/k/v biases",
                            "no Hugging Face Llama-shaped model has that; fix the shape")
        return {"model_type": mt, "vocab_size": shape.vocab, "hidden_size": shape.hidden,
                "intermediate_size": shape.ffn, "num_hidden_layers": shape.n_layers,
                "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads or shape.heads,
                "head_dim": shape.head_size, "max_position_embeddings": shape.max_seq, **bias}
    if shape.family == "opt":
        return {"model_type": "opt", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
                "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.heads, "ffn_dim": shape.ffn,
                "max_position_embeddings": shape.max_seq, "word_embed_proj_dim": shape.word_dim,
                "do_layer_norm_before": shape.final_norm}
    raise ValueError(f"no Hugging Face config for family '{shape.family}'")


DROPOUT_KEYS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "llama": ("attention_dropout",), "mistral": ("attention_dropout",), "qwen2": ("attention_dropout",),
                "opt": ("dropout", "attention_dropout", "activation_dropout")}


def hf_config(shape: TransformerShape, dropout: float):
    """The config the runtime builds from (module doc: untied head, SDPA, no cache, the
    run's dropout; OPT's layerdrop off, since skipping random layers changes the computation)."""
    from transformers import AutoConfig
    d = hf_config_dict(shape)
    mt = d.pop("model_type")
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "auto_map")}
    d.update({k: dropout for k in DROPOUT_KEYS[mt]}, tie_word_embeddings=False, use_cache=False)
    if mt == "bert":
        d["classifier_dropout"] = None  # the hidden dropout
    if mt == "opt":
        d["layerdrop"] = 0.0
    cfg = AutoConfig.for_model(mt, **d)
    cfg._attn_implementation = "sdpa"
    return cfg


def _window(cfg, i: int) -> int | None:
    """Sliding-window width of block i (Mistral: every layer; Qwen2: layer_types), or None."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return window if types[i] == "sliding_attention" else None
    return window


def _cut(family: str, model: nn.Module, cfg) -> list[nn.Module]:
    """The cost graph's layers of a Hugging Face model, in order."""
    if family == "gpt":
        t = model.transformer
        return [GPTEmbedding(t.wte, t.wpe, t.drop), *[Block(b) for b in t.h], nn.Sequential(t.ln_f, model.lm_head)]
    if family == "bert":
        b = model.bert
        return [BertEmbedding(b.embeddings), *[Block(l) for l in b.encoder.layer],
                BertHead(model.dropout, model.classifier)]
    if family == "llama":
        m = model.model
        positions = DecoderPositions(m.rotary_emb)
        return [m.embed_tokens, *[Block(l, positions, _window(cfg, i)) for i, l in enumerate(m.layers)],
                nn.Sequential(m.norm, model.lm_head)]
    d = model.model.decoder  # opt
    head = [x for x in (d.final_layer_norm, d.project_out, model.lm_head) if x is not None]
    return [OPTEmbedding(d.embed_tokens, d.embed_positions, d.project_in), *[Block(l) for l in d.layers],
            nn.Sequential(*head)]


def build_model(shape: TransformerShape, *, seed: int, dropout: float = 0.0,
                dtype: torch.dtype = torch.float32) -> BuiltModel:
    """Build the whole model with torch.manual_seed(seed) and cut it into cost-graph layers.

    Every rank builds the same whole model, so the init does not depend on the plan."""
    if shape.family not in FAMILIES:
        raise SpecError("--model", "", f"the runtime cannot build '{shape.name}' (family '{shape.family}')",
                        f"runtime families: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if shape.family == "mlp":
        model = MLPModel(shape)
        layers = [model.embed, *model.blocks, model.head]
    else:
        import transformers
        cfg = hf_config(shape, dropout)
        model = getattr(transformers, HF_CLASSES[cfg.model_type])(cfg)
        layers = _cut(shape.family, model, cfg)
    model.to(dtype)
    model.train(dropout > 0)
    return BuiltModel(shape, model, layers)


def layer_param_counts(built: BuiltModel) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in built.layers]


# ---- stage module ----------------------------------------------------------------------

class StageModule(nn.Module):
    """Layers [start, stop) of a model, run in order; parameters keep whole-model names.

    With ``recompute`` (the plan's per-stage 'full'), each block keeps only its input for
    the backward and runs its forward again there (``torch.utils.checkpoint``,
    non-reentrant; the RNG state is replayed, so dropout masks repeat); the embedding and
    the head are not recomputed (as ``hetalloc.models.LayerShape.checkpoint_bytes`` says)."""

    def __init__(self, built: BuiltModel, start: int, stop: int, recompute: bool = False):
        super().__init__()
        self.start, self.stop = start, stop
        self.recompute = recompute
        self.layers = nn.ModuleList(built.layers[start:stop])
        names = built.param_names()
        self.param_names = {id(p): names[id(p)] for p in self.layers.parameters()}
        self.train(built.model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.recompute and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute and isinstance(layer, (Block, MLPBlock)):
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def blocks(self) -> list[nn.Module]:
        """The Hugging Face transformer blocks of this stage (where tensor parallelism
        applies: TENSOR_PARALLEL_PLAN names their projections)."""
        return [layer.block for layer in self.layers if isinstance(layer, Block)]

    def named_model_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(whole-model name, parameter) in layer order."""
        return [(self.param_names[id(p)], p) for p in self.layers.parameters()]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over all tokens (computed in fp32 or wider). Logits sharded
    along the vocabulary (a tensor-parallel head, a DTensor) need ``loss_parallel`` around
    this and the backward (runtime.tensor_parallel); the loss comes back as a plain tensor."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return loss.to_local() if hasattr(loss, "to_local") else loss
