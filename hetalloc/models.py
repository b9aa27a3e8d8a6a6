"""Transformer shapes and their per-layer costs (parameters, FLOPs, activation bytes).

A model is cut into layers in execution order: ``embedding``, ``block`` x n_layers,
``head``. The runtime cuts real torch models at exactly these boundaries, so a layer
index means the same thing everywhere, and the parameter counts here are exactly those
of the layers the runtime builds (GPT-2, BERT, Llama/Mistral/Qwen2, OPT from their
Hugging Face configs; checked in the tests against the real modules).

Formulas (per sample of ``seq`` tokens, h = hidden size, a = heads, f = FFN size,
V = vocabulary, p = activation bytes per element; for grouped-query attention
q = heads * head_dim and h_kv = kv_heads * head_dim):
- block matmul parameters: attention 4h^2 (GPT-2, BERT, OPT) or 2hq + 2h*h_kv (q, o;
  k, v), MLP 2hf (GELU/ReLU) or 3hf (SwiGLU); forward FLOPs 2 * seq * matmul params +
  4 * seq^2 * q (scores and weighted sum); backward is twice the forward (the standard
  1:2 split). Biases and norms as the real modules have them (no FLOPs counted).
- saved activations of a block: Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 2) give seq*h*(34 + 5*a*seq/h) bytes
  for 16-bit activations with h-sized MLP 4h; we use its parts (attention 11*s*h + 5*a*s^2,
  norms 4*s*h, MLP 2*s*h + 4*s*f + s*h (GELU) or 2*s*h + 6*s*f (SwiGLU)) scaled by p/2.
- LM head: 2 * seq * h * V FLOPs; it saves its input and fp32 logits for the loss.
  Heads are untied from the token embedding (their own V x h matrix).
- tensor parallelism and recomputation (plan schema 2): per layer, the parameters and
  saved activations every tensor-parallel rank keeps whole, what full recomputation keeps,
  and the all-reduces of the tensor-parallel group (see ``LayerShape``, ``layer_shapes``;
  priced in ``hetalloc.costs``).

Never imports torch or transformers (the planner runs without them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError
from .fileio import read_json


@dataclass(frozen=True, slots=True)
class TransformerShape:
    name: str
    family: str
    """'gpt' (GPT-2: learned positions, GELU MLP, LM head), 'bert' (token classification
    head), 'llama' (Llama-shaped decoders: Llama, Mistral, Qwen2; RMSNorm, rotary
    positions, SwiGLU MLP, grouped-query attention), 'opt' (OPT: learned positions with
    an offset of 2, ReLU MLP, optional projections around the blocks), 'mlp' (plain MLP
    blocks). LM heads are untied from the token embedding everywhere (the runtime unties
    them too), so the head owns its own V x h matrix."""
    n_layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_seq: int
    kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means as many as ``heads``."""
    num_labels: int = 2
    head_dim: int = 0
    """Width of one attention head; 0 means hidden // heads."""
    qkv_bias: bool = False
    """'llama': biases on the q, k and v projections (Qwen2; Llama's attention_bias)."""
    out_bias: bool = False
    """'llama': bias on the attention output projection (Llama's attention_bias)."""
    mlp_bias: bool = False
    """'llama': biases on the gate, up and down projections (Llama's mlp_bias)."""
    embed_dim: int = 0
    """'opt': word embedding width (word_embed_proj_dim); 0 means hidden. When it differs,
    project_in (embedding) and project_out (head) matrices appear."""
    final_norm: bool = True
    """'opt': a final layer norm before the head (do_layer_norm_before)."""
    hf_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    """The Hugging Face config.json the shape was read from (None for built-in models).
    Recorded in cost graphs, plans and profiles so the runtime builds exactly this model."""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_hidden(self) -> int:
        return (self.kv_heads or self.heads) * self.head_size

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.hidden

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON-ready); ``shape_from_dict`` reads it back."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def shape_from_dict(d: Any, source: str = "model") -> TransformerShape:
    """A shape written by ``TransformerShape.to_dict`` (inside a cost graph, plan or profile)."""
    fields = TransformerShape.__dataclass_fields__
    if not isinstance(d, dict) or not {"name", "family"} <= set(d):
        raise SpecError(source, "model_spec", "expected a model description with name and family",
                        "re-run 'hetalloc plan' (or 'hetalloc profile')")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise SpecError(source, f"model_spec.{unknown[0]}", "unknown field", "written by a newer hetalloc? re-plan")
    try:
        return TransformerShape(**d)
    except TypeError as e:
        raise SpecError(source, "model_spec", f"malformed ({e})", "re-run 'hetalloc plan'") from None


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


HF_MODEL_TYPES = ("gpt2", "bert", "llama", "mistral", "qwen2", "opt")
"""The Hugging Face ``model_type`` values the planner counts exactly and the runtime builds."""

_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    # What transformers' config classes assume for a key a config.json leaves out (only
    # the keys that change a shape; checked against the real classes in the tests).
    "gpt2": {"n_positions": 1024},
    "bert": {"max_position_embeddings": 512, "type_vocab_size": 2},
    "llama": {"max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "opt": {"max_position_embeddings": 2048, "ffn_dim": 3072, "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "enable_bias": True, "layer_norm_elementwise_affine": True},
}


def shape_from_hf_config(cfg: dict[str, Any], name: str = "hf-model", source: str | None = None) -> TransformerShape:
    """Read a Hugging Face config.json (model_type gpt2, bert, llama, mistral, qwen2, opt)
    into a shape whose per-layer parameter counts are exactly those of the model
    transformers builds from it (LM head untied)."""
    src = source or name
    if not isinstance(cfg, dict):
        raise SpecError(src, "", "expected a JSON object (a Hugging Face config.json)", "pass a model's config.json")
    mt = cfg.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise SpecError(src, "model_type", f"unsupported model type {mt!r}" if mt else "missing",
                        f"supported: {', '.join(HF_MODEL_TYPES)}")
    defaults = _HF_DEFAULTS[mt]

    def g(*keys):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        for k in keys:
            if k in defaults:
                return defaults[k]
        raise SpecError(src, keys[0], "missing in config", f"add '{keys[0]}' to the config")

    common = dict(name=name, n_layers=int(g("n_layer", "num_hidden_layers")), hidden=int(g("n_embd", "hidden_size")),
                  heads=int(g("n_head", "num_attention_heads")), vocab=int(g("vocab_size")),
                  max_seq=int(g("n_positions", "max_position_embeddings")), hf_config=cfg)
    if mt == "gpt2":
        return TransformerShape(family="gpt", ffn=int(cfg.get("n_inner") or 4 * common["hidden"]), **common)
    if mt == "bert":
        if g("type_vocab_size") != 2:
            raise SpecError(src, "type_vocab_size", f"is {g('type_vocab_size')}; hetalloc counts BERT's 2 segments",
                            "use type_vocab_size 2")
        labels = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
        return TransformerShape(family="bert", ffn=int(g("intermediate_size")), num_labels=labels, **common)
    if mt == "opt":
        for key, want in (("enable_bias", True), ("layer_norm_elementwise_affine", True)):
            if g(key) is not want:
                raise SpecError(src, key, f"{key} = {g(key)!r} is not supported", f"use {key}: {str(want).lower()}")
        width = int(cfg.get("word_embed_proj_dim") or common["hidden"])
        return TransformerShape(family="opt", ffn=int(g("ffn_dim")), embed_dim=width,
                                final_norm=bool(g("do_layer_norm_before")) and not g("_remove_final_layer_norm"),
                                **common)
    heads = common["heads"]
    kv = int(cfg.get("num_key_value_heads") or defaults.get("num_key_value_heads", heads))
    if heads % kv:
        raise SpecError(src, "num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}",
                        "grouped-query attention needs heads divisible by key/value heads")
    head_dim = int(cfg.get("head_dim") or common["hidden"] // heads)
    attn_bias = bool(g("attention_bias")) if mt == "llama" else False
    return TransformerShape(family="llama", ffn=int(g("intermediate_size")), kv_heads=kv, head_dim=head_dim,
                            qkv_bias=attn_bias or mt == "qwen2", out_bias=attn_bias,
                            mlp_bias=bool(g("mlp_bias")) if mt == "llama" else False, **common)


def resolve_model(spec: str) -> TransformerShape:
    """A built-in name, or a path to a Hugging Face config.json (named after its file, or
    after its folder when the file is config.json), its sizes checked (check_shape)."""
    p = Path(spec)
    if p.suffix == ".json":
        cfg = read_json(p, missing_fix="check the path of the config.json", invalid_fix="fix the syntax")
        check_config_sizes(cfg, str(p))
        try:
            shape = shape_from_hf_config(cfg, p.resolve().parent.name if p.name == "config.json" else p.stem, str(p))
        except SpecError:
            raise
        except (TypeError, ValueError) as e:  # a size that is not a number
            raise SpecError(str(p), "", f"malformed config ({e})", "fix the sizes in the config") from None
        check_shape(shape, str(p))
        return shape
    return get_model(spec)


CONFIG_SIZES = ("n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head", "num_attention_heads",
                "vocab_size", "n_positions", "max_position_embeddings", "n_inner", "intermediate_size", "ffn_dim",
                "num_key_value_heads", "head_dim", "word_embed_proj_dim", "num_labels")
"""Keys of a Hugging Face config.json that are sizes: a whole number >= 1 where given."""


def check_config_sizes(cfg: Any, source: str) -> None:
    """SpecError naming the first size key of a config.json that is not a whole number >= 1."""
    if not isinstance(cfg, dict):
        return  # shape_from_hf_config says what is wrong
    for key in CONFIG_SIZES:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(source, key, f"must be a whole number >= 1, got {v!r}", "fix the model's config")


CONFIG_KEYS = {"n_layers": "n_layer / num_hidden_layers", "hidden": "n_embd / hidden_size",
               "heads": "n_head / num_attention_heads", "ffn": "n_inner / intermediate_size",
               "vocab": "vocab_size", "max_seq": "n_positions / max_position_embeddings",
               "kv_heads": "num_key_value_heads", "num_labels": "num_labels"}
"""Shape fields and the Hugging Face config keys they come from (for error messages)."""


def check_shape(shape: TransformerShape, source: str) -> None:
    """The sizes a model needs to be built: whole numbers >= 1 (kv_heads 0 means 'heads'),
    a hidden size divisible by the heads (unless head_dim says the width of a head) and
    heads divisible by the KV heads."""
    for name, key in CONFIG_KEYS.items():
        v = getattr(shape, name)
        low = 0 if name == "kv_heads" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise SpecError(source, key, f"must be a whole number >= {low}, got {v!r}", "fix the model's config")
    if not shape.head_dim and shape.hidden % shape.heads:
        raise SpecError(source, CONFIG_KEYS["hidden"], f"{shape.hidden} is not divisible by the {shape.heads} heads",
                        "fix the model's config")
    if shape.kv_heads and shape.heads % shape.kv_heads:
        raise SpecError(source, CONFIG_KEYS["kv_heads"], f"{shape.heads} heads are not divisible by "
                        f"{shape.kv_heads} KV heads", "fix the model's config")


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
    """Bytes per sample of each of those all-reduces (s*h*p: the hidden activations; s*w*p
    for OPT's embedding and LM head, of word width w)."""


def layer_shapes(m: TransformerShape, seq: int, act_bytes: int) -> list[LayerShape]:
    """Per-layer costs of model m at sequence length seq with act_bytes-byte activations.

    Tensor parallelism as in Megatron-LM (Shoeybi et al. 2019): attention heads and the
    MLP's hidden dimension are split (column-parallel first matmul, row-parallel second);
    the embedding and the LM head are split along the vocabulary; norms, output biases
    and position embeddings are replicated; a BERT token-classification head is not split.
    Per family: Llama-shaped q/k/v and gate/up biases split with their matmuls, the
    o_proj and down_proj biases are replicated, k and v split along the key/value heads
    (grouped-query attention: t must divide kv_heads); OPT's project_in and project_out
    (between the word width w and h) are replicated, and its embedding and LM head
    all-reduce w-wide activations."""
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
    # The token embedding is split along the vocabulary and its (token-width) output
    # all-reduced; the rest is kept whole on every rank.
    if m.family == "llama":
        emb_split, emb_whole, emb_width = V * h, 0, h
    elif m.family == "opt":  # token embedding of width w; positions (2 offset rows), project_in whole
        w = m.word_dim
        emb_split, emb_whole, emb_width = V * w, (m.max_seq + 2) * h + (w * h if w != h else 0), w
    else:  # token and learned positions; BERT adds 2 segment rows and a layer norm
        emb_split, emb_whole, emb_width = V * h, m.max_seq * h + (2 * h + 2 * h if m.family == "bert" else 0), h
    out.append(LayerShape("embedding", "embedding", emb_split + emb_whole, 0.0, hidden, hidden,
                          replicated_params=emb_whole, replicated_act_bytes=hidden,
                          tp_allreduces_fwd=1, tp_allreduce_bytes=s * emb_width * p))
    if m.family == "llama":
        q, kv = m.q_hidden, m.kv_hidden
        attn_w = 2 * h * q + 2 * h * kv  # q, o; k, v
        mlp_w = 3 * h * f
        biases = (q + 2 * kv if m.qkv_bias else 0) + (h if m.out_bias else 0) + (2 * f + h if m.mlp_bias else 0)
        params = attn_w + mlp_w + biases + 2 * h  # two RMSNorms
        # Kept whole: the two RMSNorms and the biases added after the row-parallel o_proj and
        # down_proj; q/k/v and gate/up biases split with their column-parallel matmuls (k, v
        # along the key/value heads, so t must divide kv_heads as in Megatron-LM).
        replicated = 2 * h + (h if m.out_bias else 0) + (h if m.mlp_bias else 0)
        mlp_saved = 2 * s * h + 6 * s * f
        mlp_kept = 2 * s * h  # its input
        score_width = q
    else:
        attn_w = 4 * h * h
        mlp_w = 2 * h * f
        params = attn_w + mlp_w + 5 * h + f + 4 * h  # weights; biases (qkv 3h, proj h, fc f, out h); 2 norms
        replicated = 4 * h + 2 * h  # 2 norms; the biases of the two row-parallel matmuls
        mlp_saved = 2 * s * h + 4 * s * f + s * h
        mlp_kept = 2 * s * h + s * h  # its input, its dropout mask
        score_width = h
    block_flops = 2.0 * s * (attn_w + mlp_w) + 4.0 * s * s * score_width
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
    elif m.family == "opt":  # final layer norm, project_out (both whole), LM head of width w
        w = m.word_dim
        proj = w * h if w != h else 0
        whole = (2 * h if m.final_norm else 0) + proj
        out.append(LayerShape("head", "head", whole + w * V, 2.0 * s * (proj + w * V), 4.0,
                              2 * hidden + s * V * 4, replicated_params=whole, replicated_act_bytes=2 * hidden,
                              tp_allreduces_bwd=1, tp_allreduce_bytes=s * w * p))
    else:  # final norm (LayerNorm 2h, RMSNorm h) and LM head
        norm = h if m.family == "llama" else 2 * h
        out.append(LayerShape("head", "head", h * V + norm, 2.0 * s * h * V, 4.0,
                              2 * hidden + s * V * 4, replicated_params=norm, replicated_act_bytes=2 * hidden,
                              tp_allreduces_bwd=1, tp_allreduce_bytes=hidden))
    return out
