"""Token sources for the runtime's datasets, opened and checked without torch.

A dataset is ``synthetic`` (generated, no file), ``text`` (the small corpus shipped in
runtime/data) or a path:
- ``*.npy``: a 1-D array of integer token ids (``np.save``; read memory-mapped, never
  unpickled);
- ``*.bin``: raw little-endian uint16 token ids, no header: the layout nanoGPT's
  ``prepare.py`` writes and Megatron-LM's ``.bin`` holds for vocabularies under 65,536
  (the ``.idx`` document index is not needed: samples are windows of the token stream);
- anything else: a text file, tokenized by bytes (token = byte value mod the vocabulary;
  for a real tokenizer, tokenize into a ``.bin`` first).

Files are memory-mapped, so a rank touches only the pages of the samples it reads. The
last ``val_fraction`` of the tokens is the validation split, the rest the training split.
``check_dataset`` runs before any rank starts (``hetalloc run``) and turns a bad path or
format into one line naming ``--dataset`` and the fix.

Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hetalloc.errors import SpecError

NAMED = ("synthetic", "text")
CORPUS = "tiny_corpus.txt"
BIN_DTYPE = np.dtype("<u2")
SCAN_LIMIT_TOKENS = 1 << 27
"""The check before launch reads at most this many tokens (256 MiB of uint16) for the id
range; larger files are checked further as samples are read."""


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A token stream on disk: `kind` 'bytes' (text), 'npy' or 'bin'."""

    path: Path
    kind: str

    def open(self) -> np.ndarray:
        """The tokens, memory-mapped (1-D; bytes as uint8)."""
        if self.kind == "npy":
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        dtype = BIN_DTYPE if self.kind == "bin" else np.uint8
        if self.path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r")


def corpus_path() -> Path:
    """The shipped corpus (a real file of the installed package)."""
    return Path(str(resources.files("runtime").joinpath("data", CORPUS)))


def token_file(spec: str) -> TokenFile | None:
    """The file behind a --dataset value (None for 'synthetic'); checks that it exists and
    has a readable format."""
    if spec == "synthetic":
        return None
    if spec == "text":
        return TokenFile(corpus_path(), "bytes")
    path = Path(spec)
    if not path.is_file():
        raise SpecError("--dataset", spec, "file not found" if not path.exists() else "is not a file",
                        f"give 'synthetic', 'text', or a text, .npy or .bin token file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SpecError("--dataset", spec, f"not a readable .npy array ({str(e).splitlines()[0][:80]})",
                            "save token ids with numpy.save(path, ids) (an integer array)") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise SpecError("--dataset", spec, f"holds a {arr.ndim}-D {arr.dtype} array",
                            "save a 1-D integer array of token ids")
        return TokenFile(path, "npy")
    if suffix == ".bin":
        if path.stat().st_size % BIN_DTYPE.itemsize:
            raise SpecError("--dataset", spec, f"has {path.stat().st_size} bytes, not a whole number of uint16 tokens",
                            "a .bin token file is raw uint16 ids (nanoGPT/Megatron layout)")
        return TokenFile(path, "bin")
    return TokenFile(path, "bytes")


@dataclass(frozen=True, slots=True)
class Split:
    """Token index ranges [start, stop) of the training and validation splits."""

    train: tuple[int, int]
    val: tuple[int, int]


def split_tokens(num_tokens: int, val_fraction: float, seq_len: int, source: str) -> Split:
    """The last val_fraction of the tokens validate, the rest train; each split must hold
    one sample (seq_len + 1 tokens: inputs and their next-token labels)."""
    n_val = int(num_tokens * val_fraction)
    n_train = num_tokens - n_val
    need = seq_len + 1
    if n_train < need:
        raise SpecError("--dataset", source, f"has {num_tokens} tokens; its training split ({n_train}) is shorter "
                        f"than one sample of {need}", "use a longer file, a shorter --seq, or a smaller --val-fraction")
    if val_fraction > 0 and n_val < need:
        raise SpecError("--dataset", source, f"has {num_tokens} tokens; its validation split ({n_val}, "
                        f"--val-fraction {val_fraction:g}) is shorter than one sample of {need}",
                        "raise --val-fraction or use a longer file")
    return Split((0, n_train), (n_train, num_tokens))


def check_token_range(tokens: np.ndarray, start: int, vocab: int, source: str) -> None:
    """Token ids must index the model's vocabulary."""
    if tokens.size == 0:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        at = start + int(np.argmax(tokens == bad))
        raise SpecError("--dataset", source, f"token id {bad} at position {at} is outside the model's vocabulary "
                        f"(0..{vocab - 1})", "tokenize with the model's tokenizer, or plan a model with a larger "
                        "vocab_size")


def check_dataset(spec: str, *, vocab: int, seq_len: int, val_fraction: float, classify: bool) -> str:
    """Everything that can be checked about a --dataset before launch; returns a one-line
    description ('text file x.txt: 7,029 byte tokens, 6,327 train / 702 validation')."""
    tf = token_file(spec)
    if tf is None:
        return "synthetic tokens"
    if classify and tf.kind != "bytes":
        raise SpecError("--dataset", spec, "a token file has no labels for a token-classification model (BERT)",
                        "train BERT on text ('text' or a text file: punctuation labels), or plan a causal LM")
    tokens = tf.open()
    split = split_tokens(len(tokens), val_fraction, seq_len, spec)
    if tf.kind != "bytes":  # byte tokens wrap into the vocabulary; token ids must fit it
        for at in range(0, min(len(tokens), SCAN_LIMIT_TOKENS), 1 << 22):
            check_token_range(np.asarray(tokens[at:min(at + (1 << 22), SCAN_LIMIT_TOKENS)]), at, vocab, spec)
    what = {"bytes": "text file", "npy": ".npy token file", "bin": ".bin token file (uint16)"}[tf.kind]
    if spec == "text":
        what = "shipped corpus"
    return (f"{what} {tf.path.name}: {len(tokens):,} {'byte ' if tf.kind == 'bytes' else ''}tokens, "
            f"{split.train[1] - split.train[0]:,} train / {split.val[1] - split.val[0]:,} validation")
