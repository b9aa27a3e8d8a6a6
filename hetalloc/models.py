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
    """A built-in name, or a path to a Hugging Face config.json (checked: check_shape)."""
    p = Path(spec)
    if p.suffix == ".json":
        cfg = read_json(p, missing_fix="check the path of the model's config.json", invalid_fix="fix the syntax")
        if not isinstance(cfg, dict):
            raise SpecError(str(p), "", "expected a JSON object (a Hugging Face config.json)", "pass a config.json")
        try:
            shape = shape_from_hf_config(cfg, p.parent.name if p.name == "config.json" else p.stem)
        except (TypeError, ValueError) as e:
            if isinstance(e, SpecError):
                raise SpecError(str(p), e.path, e.problem, e.fix) from None
            raise SpecError(str(p), "", f"malformed config ({e})", "fix the sizes in the config") from None
        check_shape(shape, str(p))
        return shape
    return get_model(spec)


CONFIG_KEYS = {"n_layers": "n_layer / num_hidden_layers", "hidden": "n_embd / hidden_size",
               "heads": "n_head / num_attention_heads", "ffn": "n_inner / intermediate_size",
               "vocab": "vocab_size", "max_seq": "n_positions / max_position_embeddings",
               "kv_heads": "num_key_value_heads", "num_labels": "num_labels"}
"""Shape fields and the Hugging Face config keys they come from (for error messages)."""


def check_shape(shape: TransformerShape, source: str) -> None:
    """The sizes a model needs to be built: whole numbers >= 1 (kv_heads 0 means 'heads'),
    a hidden size divisible by the heads and heads divisible by the KV heads."""
    for name, key in CONFIG_KEYS.items():
        v = getattr(shape, name)
        low = 0 if name == "kv_heads" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise SpecError(source, key, f"must be a whole number >= {low}, got {v!r}", "fix the model's config")
    if shape.hidden % shape.heads:
        raise SpecError(source, CONFIG_KEYS["hidden"], f"{shape.hidden} is not divisible by the {shape.heads} heads",
                        "fix the model's config")
    if shape.kv_heads and shape.heads % shape.kv_heads:
        raise SpecError(source, CONFIG_KEYS["kv_heads"], f"{shape.heads} heads are not divisible by "
                        f"{shape.kv_heads} KV heads", "fix the model's config")


@dataclass(frozen=True, slots=True)
class LayerShape:
    """Costs of one layer for one sample of ``seq`` tokens."""

    name: str
    kind: str  # embedding | block | head
    params: int
    fwd_flops: float
    out_act_bytes: float
    saved_act_bytes: float


def layer_shapes(m: TransformerShape, seq: int, act_bytes: int) -> list[LayerShape]:
    """Per-layer costs of model m at sequence length seq with act_bytes-byte activations."""
    if seq > m.max_seq and m.family != "llama":
        raise SpecError("--seq", "", f"{seq} exceeds {m.name}'s maximum context {m.max_seq}",
                        f"use --seq {m.max_seq} or less")
    h, a, f, V, s, p = m.hidden, m.heads, m.ffn, m.vocab, seq, act_bytes
    scale = p / 2  # the activation formulas are written for 16-bit activations
    out: list[LayerShape] = []
    if m.family == "mlp":
        emb = V * h
        out.append(LayerShape("embedding", "embedding", emb, 0.0, s * h * p, s * h * p))
        for i in range(m.n_layers):
            params = 2 * h * f + f + h
            out.append(LayerShape(f"block{i}", "block", params, 2.0 * s * 2 * h * f,
                                  s * h * p, s * (h + 2 * f) * p))
        out.append(LayerShape("head", "head", h * V + V, 2.0 * s * h * V, 4.0, s * h * p + s * V * 4))
        return out
    pos = 0 if m.family == "llama" else m.max_seq * h
    emb_params = V * h + pos + (2 * h + 2 * h if m.family == "bert" else 0)
    out.append(LayerShape("embedding", "embedding", emb_params, 0.0, s * h * p, s * h * p))
    if m.family == "llama":
        attn_w = 2 * h * h + 2 * h * m.kv_hidden
        mlp_w = 3 * h * f
        params = attn_w + mlp_w + 2 * h
        mlp_saved = 2 * s * h + 6 * s * f
    else:
        attn_w = 4 * h * h
        mlp_w = 2 * h * f
        params = attn_w + mlp_w + 5 * h + f + 4 * h  # weights; biases (qkv 3h, proj h, fc f, out h); 2 norms
        mlp_saved = 2 * s * h + 4 * s * f + s * h
    block_flops = 2.0 * s * (attn_w + mlp_w) + 4.0 * s * s * h
    block_saved = (11 * s * h + 5 * a * s * s + 4 * s * h + mlp_saved) * scale
    for i in range(m.n_layers):
        out.append(LayerShape(f"block{i}", "block", params, block_flops, s * h * p, block_saved))
    if m.family == "bert":
        labels = m.num_labels
        out.append(LayerShape("head", "head", h * labels + labels, 2.0 * s * h * labels, 4.0,
                              s * h * p + s * labels * 4))
    else:
        norm = 2 * h
        out.append(LayerShape("head", "head", h * V + norm, 2.0 * s * h * V, 4.0,
                              2 * s * h * p + s * V * 4))
    return out
