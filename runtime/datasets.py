"""Deterministic token data, and which samples of a global batch each rank reads.

Every dataset is a pure function of (seed, split, sample index), so a rank computes or
reads only its own samples and a resumed run sees exactly the data it would have seen:
- ``synthetic``: arithmetic token sequences (start + k * stride mod V) with 10 % of the
  tokens replaced at random. Causal LMs predict the next token; token classifiers label
  the replaced tokens (1) against the rest (0). Both are learnable, so the loss falls.
  Validation samples come from their own index range (VAL_INDEX_BASE and up).
- ``text`` (the small corpus shipped in runtime/data) or a file (runtime.tokens: a text
  file, or pre-tokenized ``.npy`` / uint16 ``.bin``, memory-mapped): windows of seq + 1
  tokens. A training sample starts at a pseudo-random offset of the training split (a
  hash of its index and the seed); validation sample j is the j-th consecutive window
  of the validation split (wrapping), the same windows at every evaluation. Text is
  tokenized by bytes (token = byte value mod the vocabulary); token classifiers label
  non-alphanumeric bytes (spaces, punctuation) as 1. Token ids outside the vocabulary
  are an error, not wrapped.

Global batch layout (the runtime and the single-device reference agree on it): step n
uses samples [n * B, (n + 1) * B); replica r takes a contiguous block of
num_microbatches * (its micro-batch size) samples after the blocks of replicas < r;
micro-batch m of a replica is its m-th consecutive slice; inside a micro-batch a stage's
devices take consecutive slices of their shares in listed order. An evaluation reads
validation batches k = 0, 1, ... laid out the same way from sample k * B.
"""

from __future__ import annotations

import numpy as np
import torch

from hetalloc.plan import Plan

from .tokens import check_token_range, split_tokens, token_file

VAL_INDEX_BASE = 1 << 31
"""Synthetic validation sample j is generated as sample VAL_INDEX_BASE + j (torch's CPU
generator keeps only the low 32 bits of a seed, so the base must stay below 2^32)."""
SPLITS = ("train", "val")


class TokenDataset:
    """(split, sample i) -> (input_ids[seq_len], labels[seq_len]) as int64 tensors."""

    def __init__(self, kind: str, *, vocab: int, seq_len: int, seed: int, classify: bool,
                 val_fraction: float = 0.1):
        self.kind, self.vocab, self.seq_len, self.seed, self.classify = kind, vocab, seq_len, seed, classify
        self.file = token_file(kind)
        if self.file is not None:
            self.tokens = self.file.open()
            self.split = split_tokens(len(self.tokens), val_fraction, seq_len, kind)

    def sample(self, index: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        if self.file is None:
            return self._synthetic(index if split == "train" else VAL_INDEX_BASE + index)
        return self._window(index, split)

    def batch(self, start: int, count: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(i, split) for i in range(start, start + count)]
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

    def _window(self, index: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        lo, hi = self.split.train if split == "train" else self.split.val
        span = hi - lo - T  # window starts that leave room for T + 1 tokens
        if split == "train":
            offset = lo + (index * 2654435761 + self.seed * 40503) % span
        else:
            offset = lo + (index * T) % span
        window = np.asarray(self.tokens[offset:offset + T + 1]).astype(np.int64)
        if self.file.kind == "bytes":
            raw = torch.from_numpy(window)
            tokens = raw % self.vocab
        else:
            check_token_range(window, offset, self.vocab, self.kind)
            raw = tokens = torch.from_numpy(window)
        if self.classify:
            text = raw[:T]
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
