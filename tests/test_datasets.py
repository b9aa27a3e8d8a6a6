"""Real data (in one process): a user's text, .npy and uint16 .bin token files are read
memory-mapped as windows of the stream, split into training and validation tokens, and
every bad path or format is one line naming --dataset, said by 'hetalloc run' before
any rank starts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hetalloc.cluster import load_cluster
from hetalloc.cli import main
from hetalloc.errors import SpecError
from runtime.datasets import TokenDataset
from runtime.plans import cpu_cost_graph, hand_plan
from runtime.tokens import check_dataset

ROOT = Path(__file__).resolve().parents[1]
T = 16


def token_stream(n: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


@pytest.fixture
def files(tmp_path):
    ids = token_stream(1000)
    ids.tofile(tmp_path / "train.bin")  # nanoGPT's prepare.py writes exactly this
    np.save(tmp_path / "tokens.npy", ids.astype(np.int32))
    (tmp_path / "notes.txt").write_bytes(bytes(ids.astype(np.uint8)))
    return tmp_path, ids


@pytest.mark.parametrize("name", ["train.bin", "tokens.npy", "notes.txt"])
def test_samples_are_windows_of_their_split(files, name):
    d, ids = files
    ds = TokenDataset(str(d / name), vocab=256, seq_len=T, seed=3, classify=False, val_fraction=0.1)
    assert isinstance(ds.tokens, np.memmap)  # read lazily, page by page
    assert ds.split.train == (0, 900) and ds.split.val == (900, 1000)
    stream = torch.from_numpy(ids.astype(np.int64))
    for split, (lo, hi) in (("train", ds.split.train), ("val", ds.split.val)):
        x, y = ds.batch(7, 5, split)
        assert x.shape == y.shape == (5, T) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, label in zip(x, y):
            starts = [o for o in range(lo, hi - T) if torch.equal(stream[o:o + T], row)]
            assert starts and torch.equal(stream[starts[0] + 1:starts[0] + T + 1], label)
        assert torch.equal(ds.batch(7, 5, split)[0], x)  # a pure function of the index
    # validation windows are consecutive: sample j starts T tokens after sample j - 1
    v0, v1 = ds.sample(0, "val")[0], ds.sample(1, "val")[0]
    assert torch.equal(v0, stream[900:900 + T]) and torch.equal(v1, stream[900 + T:900 + 2 * T])


def test_synthetic_validation_samples_differ_from_training_samples():
    ds = TokenDataset("synthetic", vocab=256, seq_len=T, seed=0, classify=False)
    train = {tuple(ds.sample(i)[0].tolist()) for i in range(50)}
    assert not train & {tuple(ds.sample(j, "val")[0].tolist()) for j in range(50)}


def _bad(d: Path) -> dict[str, tuple[str, str]]:
    (d / "odd.bin").write_bytes(b"\x01\x02\x03")
    np.save(d / "matrix.npy", np.zeros((4, 4), dtype=np.int64))
    np.save(d / "floats.npy", np.zeros(100, dtype=np.float32))
    (d / "pickled.npy").write_bytes(pickle.dumps([1, 2, 3]))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    token_stream(100).tofile(d / "short.bin")
    np.save(d / "big_ids.npy", np.array([5] * 500 + [50257] + [5] * 500, dtype=np.int64))
    return {"missing.bin": ("file not found", ""), "odd.bin": ("not a whole number of uint16 tokens", ""),
            "matrix.npy": ("2-D int64 array", ""), "floats.npy": ("1-D float32 array", ""),
            "pickled.npy": ("not a readable .npy array", ""), "objects.npy": ("not a readable .npy array", ""),
            "short.bin": ("validation split (10, --val-fraction 0.1) is shorter than one sample", ""),
            "big_ids.npy": ("token id 50257 at position 500 is outside the model's vocabulary (0..255)", "")}


def test_bad_dataset_files_are_one_line_naming_the_flag(tmp_path):
    for name, (problem, _) in _bad(tmp_path).items():
        with pytest.raises(SpecError) as e:
            check_dataset(str(tmp_path / name), vocab=256, seq_len=T, val_fraction=0.1, classify=False)
        msg = str(e.value)
        assert msg.startswith(f"--dataset: {tmp_path / name}: ") and problem in msg and "\n" not in msg, msg
    token_stream(1000).tofile(tmp_path / "ok.bin")
    with pytest.raises(SpecError, match="no labels for a token-classification model"):
        check_dataset(str(tmp_path / "ok.bin"), vocab=256, seq_len=T, val_fraction=0.1, classify=True)
    assert check_dataset("text", vocab=256, seq_len=T, val_fraction=0.1, classify=True).startswith("shipped corpus")
    assert "900 train / 100 validation" in check_dataset(str(tmp_path / "ok.bin"), vocab=256, seq_len=T,
                                                         val_fraction=0.1, classify=False)


def test_hetalloc_run_refuses_bad_data_before_launching(tmp_path, capsys):
    plan = hand_plan(load_cluster(ROOT / "examples" / "cpu-4.yaml"), cpu_cost_graph("mlp-tiny", T),
                     [[((0, 6), [("host/0", 1), ("host/1", 1)])]], num_microbatches=1)
    plan.save(tmp_path / "plan.json")
    _bad(tmp_path)
    for extra, expect in ((["--dataset", str(tmp_path / "odd.bin")], "--dataset: "),
                          (["--dataset", str(tmp_path / "missing.txt")], "file not found"),
                          (["--dataset", "text", "--eval-every", "-1"], "--eval-every: must be a whole number >= 0"),
                          (["--dataset", "text", "--val-fraction", "1.5"], "--val-fraction: must be >= 0 and < 1")):
        assert main(["run", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), *extra]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], captured.err
        assert "hetalloc runtime" not in captured.out and not (tmp_path / "out").exists()  # no rank started
