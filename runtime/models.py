"""Real torch models, cut at the cost graph's layer boundaries.

A model is built whole from a ``hetalloc.models.TransformerShape`` (random init from a
seed, no download) and cut into the layers the cost graph lists: ``embedding``,
``block`` x n_layers, ``head``. Each layer is a small module that owns exactly that
layer's parameters, so a stage that holds layers [start, stop) owns exactly their
parameters. Parameters keep their names in the whole model (``transformer.h.3.mlp...``),
so checkpoints and comparisons do not depend on how a plan cut the model.

Families: 'gpt' (Hugging Face GPT2LMHeadModel, untied LM head as the cost graph counts
it, SDPA attention so blocks called one by one stay causal), 'bert'
(BertForTokenClassification without pooler), 'mlp' (plain torch: embedding, residual
MLP blocks, linear head; for fast tests).

The loss is the summed token cross-entropy; callers divide by the number of tokens of
the whole global batch, which makes every device's gradient carry its share's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetalloc.errors import SpecError
from hetalloc.models import TransformerShape

from .config import FAMILIES  # defined without torch: the launcher checks --model with it

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---- layers ----------------------------------------------------------------------------

class GPTEmbedding(nn.Module):
    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions)[None])


class Block(nn.Module):
    """A Hugging Face transformer block called on hidden states alone (no mask, no cache)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


class GPTHead(nn.Module):
    def __init__(self, ln_f: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


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


def hf_config(shape: TransformerShape, dropout: float):
    """The Hugging Face config of a shape (random init, nothing downloaded)."""
    if shape.family == "gpt":
        from transformers import GPT2Config
        cfg = GPT2Config(vocab_size=shape.vocab, n_positions=shape.max_seq, n_embd=shape.hidden,
                         n_layer=shape.n_layers, n_head=shape.heads, n_inner=shape.ffn,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    elif shape.family == "bert":
        from transformers import BertConfig
        cfg = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.n_layers,
                         num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                         max_position_embeddings=shape.max_seq, num_labels=shape.num_labels,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                         pad_token_id=0)
    else:
        raise ValueError(f"no Hugging Face config for family '{shape.family}'")
    # Blocks are called one by one without a mask: SDPA applies the causal mask itself.
    cfg._attn_implementation = "sdpa"
    return cfg


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
    elif shape.family == "gpt":
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(hf_config(shape, dropout))
        t = model.transformer
        layers = [GPTEmbedding(t.wte, t.wpe, t.drop), *[Block(b) for b in t.h], GPTHead(t.ln_f, model.lm_head)]
    else:
        from transformers import BertForTokenClassification
        model = BertForTokenClassification(hf_config(shape, dropout))
        b = model.bert
        layers = [BertEmbedding(b.embeddings), *[Block(l) for l in b.encoder.layer],
                  BertHead(model.dropout, model.classifier)]
    model.to(dtype)
    model.train(dropout > 0)
    return BuiltModel(shape, model, layers)


def layer_param_counts(built: BuiltModel) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in built.layers]


# ---- stage module ----------------------------------------------------------------------

class StageModule(nn.Module):
    """Layers [start, stop) of a model, run in order; parameters keep whole-model names."""

    def __init__(self, built: BuiltModel, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.layers = nn.ModuleList(built.layers[start:stop])
        names = built.param_names()
        self.param_names = {id(p): names[id(p)] for p in self.layers.parameters()}
        self.train(built.model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def named_model_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(whole-model name, parameter) in layer order."""
        return [(self.param_names[id(p)], p) for p in self.layers.parameters()]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over all tokens (computed in fp32 or wider)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
