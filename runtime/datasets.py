"""Deterministic token data, and which samples of a global batch each rank reads.

Two datasets, both a pure function of (seed, sample index), so a rank computes only its
own samples and a resumed run sees exactly the data it would have seen:
- ``synthetic``: arithmetic token sequences (start + k * stride mod V) with 10 % of the
  tokens replaced at random. Causal LMs predict the next token; token classifiers label
  the replaced tokens (1) against the rest (0). Both are learnable, so the loss falls.
- ``text``: windows of the small corpus shipped in runtime/data, tokenised by a byte
  tokenizer (token = byte value, modulo the vocabulary). Token classifiers label
  non-alphanumeric bytes (spaces, punctuation) as 1.

Global batch layout (the runtime and the single-device reference agree on it): step n
uses samples [n * B, (n + 1) * B); replica r takes a contiguous block of
num_microbatches * (its micro-batch size) samples after the blocks of replicas < r;
micro-batch m of a replica is its m-th consecutive slice; inside a micro-batch a stage's
devices take consecutive slices of their shares in listed order.
"""

from __future__ import annotations

from importlib import resources

import torch

from hetalloc.plan import Plan

CORPUS = "tiny_corpus.txt"


class TokenDataset:
    """Sample i -> (input_ids[seq_len], labels[seq_len]) as int64 tensors."""

    def __init__(self, kind: str, *, vocab: int, seq_len: int, seed: int, classify: bool):
        self.kind, self.vocab, self.seq_len, self.seed, self.classify = kind, vocab, seq_len, seed, classify
        if kind == "text":
            raw = resources.files("runtime").joinpath("data", CORPUS).read_bytes()
            self.corpus = torch.tensor(list(raw), dtype=torch.int64)
            if len(self.corpus) < seq_len + 2:
                raise ValueError(f"the corpus has {len(self.corpus)} bytes, fewer than seq_len + 2")
        elif kind != "synthetic":
            raise ValueError(f"unknown dataset '{kind}'")

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "text":
            return self._text(index)
        return self._synthetic(index)

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(i) for i in range(start, start + count)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _synthetic(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T, V = self.seq_len, self.vocab
        start = int(torch.randint(V, (1,), generator=g))
        stride = int(torch.randint(1, 8, (1,), generator=g))
        clean = (start + torch.arange(T + 1) * stride) % V
        noise = torch.randint(V, (T + 1,), generator=g)
        replaced = (torch.rand(T + 1, generator=g) < 0.1) & (noise != clean)
        tokens = torch.where(replaced, noise, clean)
        if self.classify:
            return tokens[:T], replaced[:T].long()
        return tokens[:T], tokens[1:]

    def _text(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        span = len(self.corpus) - T - 1
        offset = (index * 2654435761 + self.seed * 40503) % span
        window = self.corpus[offset:offset + T + 1]
        tokens = window % self.vocab
        if self.classify:
            text = window[:T]
            alnum = ((text >= 48) & (text <= 57)) | ((text >= 65) & (text <= 90)) | ((text >= 97) & (text <= 122))
            return tokens[:T], (~alnum).long()
        return tokens[:T], tokens[1:]


def replica_offsets(plan: Plan) -> list[int]:
    """First sample of each replica's block within the global batch."""
    out, at = [], 0
    for r in plan.replicas:
        out.append(at)
        at += plan.num_microbatches * r.microbatch
    return out


def device_samples(plan: Plan, replica: int, stage: int, group_index: int, microbatch: int) -> tuple[int, int]:
    """(first sample within the global batch, count) that a stage's group (every device of
    it) handles in a micro-batch."""
    r = plan.replicas[replica]
    s = r.stages[stage]
    before = sum(g.share for g in s.groups[:group_index])
    first = replica_offsets(plan)[replica] + microbatch * r.microbatch + before
    return first, s.groups[group_index].share
