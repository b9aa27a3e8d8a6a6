"""Transformer shapes and their per-layer costs (parameters, FLOPs, activation bytes).

A model is cut into layers in execution order: ``embedding``, ``block`` x n_layers,
``head``. The runtime cuts real torch models at exactly these boundaries, so a layer
index means the same thing everywhere.

Formulas (per sample of ``seq`` tokens, h = hidden size, a = heads, f = FFN size,
V = vocabulary, p = activation bytes per element):
- block matmul parameters: attention 2h^2 + 2h*h_kv (q, o, k, v), MLP 2hf (GELU) or
  3hf (SwiGLU); forward FLOPs 2 * seq * matmul params + 4 * seq^2 * h (scores and
  weighted sum); backward is twice the forward (the standard 1:2 split).
- saved activations of a block: Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 2) give seq*h*(34 + 5*a*seq/h) bytes
  for 16-bit activations with h-sized MLP 4h; we use its parts (attention 11*s*h + 5*a*s^2,
  norms 4*s*h, MLP 2*s*h + 4*s*f + s*h (GELU) or 2*s*h + 6*s*f (SwiGLU)) scaled by p/2.
- LM head: 2 * seq * h * V FLOPs; it saves its input and fp32 logits for the loss.
- tensor parallelism and recomputation (plan schema 2): per layer, the parameters and
  saved activations every tensor-parallel rank keeps whole, what full recomputation keeps,
  and the all-reduces of the tensor-parallel group (see ``LayerShape``, ``layer_shapes``;
  priced in ``hetalloc.costs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError
from .fileio import read_json


@dataclass(frozen=True, slots=True)
class TransformerShape:
    name: str
    family: str
    """'gpt' (learned positions, GELU MLP, LM head), 'bert' (token classification head),
    'llama' (rotary positions, SwiGLU MLP, untied LM head), 'mlp' (plain MLP blocks)."""
    n_layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_seq: int
    kv_heads: int = 0
    num_labels: int = 2

    @property
    def kv_hidden(self) -> int:
        return self.hidden * (self.kv_heads or self.heads) // self.heads


def _gpt(name, layers, hidden, heads, seq=1024, vocab=50257):
    return TransformerShape(name, "gpt", layers, hidden, heads, 4 * hidden, vocab, seq)


MODELS: dict[str, TransformerShape] = {
    m.name: m
    for m in [
        # GPT-2 (Radford et al. 2019; Hugging Face gpt2* configs).
        _gpt("gpt2-small", 12, 768, 12),
        _gpt("gpt2-medium", 24, 1024, 16),
        _gpt("gpt2-large", 36, 1280, 20),
        _gpt("gpt2-xl", 48, 1600, 25),
        # BERT (Devlin et al. 2019) with a token-classification head (2 labels by default).
        TransformerShape("bert-base", "bert", 12, 768, 12, 3072, 30522, 512),
        TransformerShape("bert-large", "bert", 24, 1024, 16, 4096, 30522, 512),
        # GPT-3 (Brown et al. 2020, table 2.1), context 2048.
        _gpt("gpt3-1.3b", 24, 2048, 16, 2048),
        _gpt("gpt3-2.7b", 32, 2560, 32, 2048),
        _gpt("gpt3-6.7b", 32, 4096, 32, 2048),
        _gpt("gpt3-13b", 40, 5120, 40, 2048),
        _gpt("gpt3-175b", 96, 12288, 96, 2048),
        # Llama 2 (Touvron et al. 2023), context 4096; 70B uses 8 KV heads (GQA).
        TransformerShape("llama2-7b", "llama", 32, 4096, 32, 11008, 32000, 4096),
        TransformerShape("llama2-13b", "llama", 40, 5120, 40, 13824, 32000, 4096),
        TransformerShape("llama2-70b", "llama", 80, 8192, 64, 28672, 32000, 4096, kv_heads=8),
        # Small models for tests and CPU runs.
        _gpt("gpt2-tiny", 4, 64, 4, 64, 256),
        TransformerShape("bert-tiny", "bert", 4, 64, 4, 256, 256, 64),
        TransformerShape("mlp-tiny", "mlp", 4, 64, 1, 256, 256, 16),
    ]
}
MODELS["gpt2"] = MODELS["gpt2-small"]


def get_model(name: str) -> TransformerShape:
    if name in MODELS:
        return MODELS[name]
    import difflib
    close = difflib.get_close_matches(name, sorted(MODELS), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(MODELS))}"
    raise SpecError("--model", "", f"unknown model '{name}'", hint + " (or pass a Hugging Face config.json)")


def shape_from_hf_config(cfg: dict[str, Any], name: str = "hf-model") -> TransformerShape:
    """Read a Hugging Face config.json (GPT-2, BERT, Llama, OPT, Mistral) into a shape."""
    mt = cfg.get("model_type", "")

    def g(*keys, default=None):
        for k in keys:
            if k in cfg and cfg[k] is not None:
                return cfg[k]
        if default is None:
            raise SpecError(name, keys[0], "missing in config", f"add '{keys[0]}' to the config")
        return default

    hidden = g("n_embd", "hidden_size", "d_model")
    layers = g("n_layer", "num_hidden_layers", "num_layers")
    heads = g("n_head", "num_attention_heads")
    vocab = g("vocab_size")
    seq = g("n_positions", "max_position_embeddings", default=2048)
    if mt == "bert":
        return TransformerShape(name, "bert", layers, hidden, heads, g("intermediate_size"), vocab, seq,
                                num_labels=int(cfg.get("num_labels", len(cfg.get("id2label", {})) or 2)))
    if mt in ("llama", "mistral", "qwen2"):
        return TransformerShape(name, "llama", layers, hidden, heads, g("intermediate_size"), vocab, seq,
                                kv_heads=g("num_key_value_heads", default=heads))
    ffn = g("n_inner", "intermediate_size", "ffn_dim", default=4 * hidden) or 4 * hidden
    return TransformerShape(name, "gpt", layers, hidden, heads, ffn, vocab, seq)


def resolve_model(spec: str) -> TransformerShape:
    """A built-in name, or a path to a Hugging Face config.json."""
    p = Path(spec)
    if p.suffix == ".json" and p.exists():
        cfg = read_json(p, missing_fix="check the path", invalid_fix="fix the syntax")
        return shape_from_hf_config(cfg, p.parent.name if p.name == "config.json" else p.stem)
    return get_model(spec)


@dataclass(frozen=True, slots=True)
class LayerShape:
    """Costs of one layer for one sample of ``seq`` tokens.

    The last five fields say how the layer splits under Megatron-style tensor parallelism
    and what full recomputation keeps; a cost graph written before they existed has them
    at 0 (``CostGraph.supports_tp`` tells), and serialises them only when set, so its
    fingerprint does not change."""

    name: str
    kind: str  # embedding | block | head
    params: int
    fwd_flops: float
    out_act_bytes: float
    saved_act_bytes: float
    replicated_params: int = 0
    """Parameters every tensor-parallel rank keeps whole: norms, the biases added after a
    row-parallel matmul, position embeddings, and all of a layer Megatron does not split."""
    replicated_act_bytes: float = 0.0
    """The part of ``saved_act_bytes`` every tensor-parallel rank keeps whole (Korthikanti et
    al. 2022, section 4.2.2: norm inputs, the inputs of the first attention and MLP matmuls,
    dropout masks: 10sh of a GPT block's 34sh)."""
    checkpoint_bytes: float = 0.0
    """Bytes per sample that full recomputation keeps of this layer (its input, s*h*p);
    0 for layers that are not recomputed (embedding, head)."""
    tp_allreduces_fwd: int = 0
    """All-reduces of the tensor-parallel group in the layer's forward (a block: 2, after
    attention and after the MLP; the vocabulary-parallel embedding: 1)."""
    tp_allreduces_bwd: int = 0
    """All-reduces in its backward (a block: 2, the conjugates of the forward's identity
    ops; the vocabulary-parallel LM head: 1, its input gradient)."""
    tp_allreduce_bytes: float = 0.0
    """Bytes per sample of each of those all-reduces (s*h*p: the hidden activations)."""


def layer_shapes(m: TransformerShape, seq: int, act_bytes: int) -> list[LayerShape]:
    """Per-layer costs of model m at sequence length seq with act_bytes-byte activations.

    Tensor parallelism as in Megatron-LM (Shoeybi et al. 2019): attention heads and the
    MLP's hidden dimension are split (column-parallel first matmul, row-parallel second);
    the embedding and the LM head are split along the vocabulary; norms, output biases
    and position embeddings are replicated; a BERT token-classification head is not split."""
    if seq > m.max_seq and m.family != "llama":
        raise SpecError("--seq", "", f"{seq} exceeds {m.name}'s maximum context {m.max_seq}",
                        f"use --seq {m.max_seq} or less")
    h, a, f, V, s, p = m.hidden, m.heads, m.ffn, m.vocab, seq, act_bytes
    scale = p / 2  # the activation formulas are written for 16-bit activations
    hidden = s * h * p  # one sample's hidden activations: what TP all-reduces and recompute keeps
    out: list[LayerShape] = []
    if m.family == "mlp":
        emb = V * h
        out.append(LayerShape("embedding", "embedding", emb, 0.0, hidden, hidden,
                              replicated_act_bytes=hidden, tp_allreduces_fwd=1, tp_allreduce_bytes=hidden))
        for i in range(m.n_layers):
            params = 2 * h * f + f + h
            out.append(LayerShape(f"block{i}", "block", params, 2.0 * s * 2 * h * f,
                                  hidden, s * (h + 2 * f) * p, replicated_params=h, replicated_act_bytes=hidden,
                                  checkpoint_bytes=hidden, tp_allreduces_fwd=1, tp_allreduces_bwd=1,
                                  tp_allreduce_bytes=hidden))
        out.append(LayerShape("head", "head", h * V + V, 2.0 * s * h * V, 4.0, hidden + s * V * 4,
                              replicated_act_bytes=hidden, tp_allreduces_bwd=1, tp_allreduce_bytes=hidden))
        return out
    pos = 0 if m.family == "llama" else m.max_seq * h
    emb_extra = 2 * h + 2 * h if m.family == "bert" else 0  # token types, layer norm
    out.append(LayerShape("embedding", "embedding", V * h + pos + emb_extra, 0.0, hidden, hidden,
                          replicated_params=pos + emb_extra, replicated_act_bytes=hidden,
                          tp_allreduces_fwd=1, tp_allreduce_bytes=hidden))
    if m.family == "llama":
        attn_w = 2 * h * h + 2 * h * m.kv_hidden
        mlp_w = 3 * h * f
        params = attn_w + mlp_w + 2 * h
        replicated = 2 * h  # two RMSNorms
        mlp_saved = 2 * s * h + 6 * s * f
        mlp_kept = 2 * s * h  # its input
    else:
        attn_w = 4 * h * h
        mlp_w = 2 * h * f
        params = attn_w + mlp_w + 5 * h + f + 4 * h  # weights; biases (qkv 3h, proj h, fc f, out h); 2 norms
        replicated = 4 * h + 2 * h  # 2 norms; the biases of the two row-parallel matmuls
        mlp_saved = 2 * s * h + 4 * s * f + s * h
        mlp_kept = 2 * s * h + s * h  # its input, its dropout mask
    block_flops = 2.0 * s * (attn_w + mlp_w) + 4.0 * s * s * h
    block_saved = (11 * s * h + 5 * a * s * s + 4 * s * h + mlp_saved) * scale
    # Kept whole on every rank: the QKV input and the attention dropout mask (3sh of the
    # attention's 11sh), both norms' inputs (4sh), the MLP's input (and dropout mask).
    block_kept = (3 * s * h + 4 * s * h + mlp_kept) * scale
    for i in range(m.n_layers):
        out.append(LayerShape(f"block{i}", "block", params, block_flops, hidden, block_saved,
                              replicated_params=replicated, replicated_act_bytes=block_kept,
                              checkpoint_bytes=hidden, tp_allreduces_fwd=2, tp_allreduces_bwd=2,
                              tp_allreduce_bytes=hidden))
    if m.family == "bert":
        labels = m.num_labels
        hp = h * labels + labels
        saved = hidden + s * labels * 4
        out.append(LayerShape("head", "head", hp, 2.0 * s * h * labels, 4.0, saved,
                              replicated_params=hp, replicated_act_bytes=saved))
    else:
        norm = 2 * h
        out.append(LayerShape("head", "head", h * V + norm, 2.0 * s * h * V, 4.0,
                              2 * hidden + s * V * 4, replicated_params=norm, replicated_act_bytes=2 * hidden,
                              tp_allreduces_bwd=1, tp_allreduce_bytes=hidden))
    return out
