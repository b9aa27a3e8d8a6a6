"""Every bad input is one line: for each verb (plan, simulate, whatif, demo, profile, run),
a user's mistake exits with code 2 and exactly one line on stderr that names the file or
the flag, with no traceback, before anything is solved, simulated, launched or written
(no output file or folder is left behind).

The CLI runs in this process (hetalloc.cli.main) where it can: every check happens before
any solve, simulation or launch, so these cases take milliseconds. A few run as
subprocesses, the way a user starts them: ``run`` with a mistake only a rank can see (a
checkpoint directory whose latest.json names a missing step), where torchrun's failure
report must not follow the one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hetalloc.cli import main
from hetalloc.cluster import load_cluster
from runtime.plans import cpu_cost_graph, hand_plan

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "examples" / "cpu-2-slow.yaml"
HF_GPT = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 64}


def _mutated(d: dict, change) -> dict:
    d = copy.deepcopy(d)
    change(d)
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of good and bad inputs; the cases run in it (outputs go here too)."""
    w = tmp_path_factory.mktemp("bad")
    plan = hand_plan(load_cluster(CLUSTER), cpu_cost_graph("gpt2-tiny", 32),
                     [[((0, 3), [("host/0", 2)]), ((3, 6), [("host/1", 2)])]], num_microbatches=2)
    plan.save(w / "plan.json")
    d = json.loads((w / "plan.json").read_text())
    cg = d["cost_graph"]["spec"]
    group0 = lambda x: x["replicas"][0]["stages"][0]["groups"][0]  # noqa: E731
    files = {
        "baddev.json": _mutated(d, lambda x: group0(x).update(devices=["host/9"])),
        "tpmixed.json": _mutated(d, lambda x: group0(x).update(devices=["host/0", "host/1"])),
        "recompute.json": _mutated(d, lambda x: x["replicas"][0]["stages"][0].update(recompute="sometimes")),
        "v1share.json": _mutated(d, lambda x: x.update(schema_version=1) or x["replicas"][0]["stages"][0].update(
            devices=[{"id": "host/0", "share": 2.5}])),
        "badsched.json": _mutated(d, lambda x: x.update(schedule="zigzag")),
        "norep.json": _mutated(d, lambda x: x.update(replicas=[])),
        "repdict.json": _mutated(d, lambda x: x.update(replicas={"a": 1})),
        "stagesint.json": _mutated(d, lambda x: x["replicas"][0].update(stages=5)),
        "sharestr.json": _mutated(d, lambda x: group0(x).update(share="2")),
        "seqstr.json": _mutated(d, lambda x: x.update(seq_len="abc")),
        "layersneg.json": _mutated(d, lambda x: x["replicas"][0]["stages"][0].update(layers=[-1, 3])),
        "badcg_plan.json": _mutated(d, lambda x: x["cost_graph"]["spec"]["layers"][1].update(params=-5)),
        "cg_negparams.json": _mutated(cg, lambda x: x["layers"][2].update(params=-100)),
        "cg_negflops.json": _mutated(cg, lambda x: x["layers"][2].update(fwd_flops=-1.0)),
        "cg_nolayers.json": _mutated(cg, lambda x: x.update(layers=[])),
        "cg_negseq.json": _mutated(cg, lambda x: x.update(seq_len=-3)),
        "cg_badtable.json": _mutated(cg, lambda x: x.update(tables={"CPU": {
            "batch_sizes": [1], "fwd_s": [[-1.0]] * 6, "bwd_s": [[1.0]] * 6}})),
        "cg_fewer.json": _mutated(cg, lambda x: x.update(layers=x["layers"][:4])),
        "hf_neglayers.json": HF_GPT | {"n_layer": -2},
        "hf_zeroheads.json": HF_GPT | {"n_head": 0},
        "hf_strhidden.json": HF_GPT | {"n_embd": "x"},
        "hf_indivisible.json": HF_GPT | {"n_embd": 66},
        "list.json": [1, 2],
    }
    for name, content in files.items():
        (w / name).write_text(json.dumps(content))
    (w / "broken.json").write_text("{")
    (w / "broken.yaml").write_text("name: x\nnodes: [\n")
    (w / "binary.yaml").write_bytes(b"\xff\xfe\x00name")
    (w / "one-cpu.yaml").write_text("name: one\nnodes:\n  - name: host\n    gpus: [{type: CPU, count: 1}]\n"
                                    "    intra_link: SharedMem\n")
    (w / "a-file").write_text("not a directory\n")
    (w / "adir").mkdir()
    (w / "ckpt-other").mkdir()
    (w / "ckpt-other" / "latest.json").write_text(json.dumps({"step": 2, "plan_key": "0123456789abcdef",
                                                             "world_size": 2}))
    # A GPU plan bigger than any one machine: 'run' must see the GPUs missing before launching.
    gpu = w / "gpu-64.yaml"
    gpu.write_text("name: gpu-64\nnodes:\n  - name: big\n    gpus: [{type: A100-80G, count: 64}]\n"
                   "    intra_link: NVLink3\n")
    gcl = load_cluster(gpu)
    hand_plan(gcl, cpu_cost_graph("gpt2-tiny", 32), [[((0, 6), [(f"big/{i}", 1) for i in range(64)])]],
              num_microbatches=1).save(w / "gpu-plan.json")
    return w


P = ["--cluster", str(CLUSTER), "--model", "gpt2-tiny", "--seq", "32", "--time-limit", "5", "-q", "--no-compare"]
SWEEP = ["--sweep", "nic=10..400Gb/s:3"]

# (argv, what the one line must name). {w} is the work folder; outputs point into it.
CASES: list[tuple[list[str], str]] = [
    # plan
    (["plan", "--cluster", "{w}/adir", "--model", "gpt2-tiny", "-o", "{w}/p.json"], "--cluster"),
    (["plan", "--cluster", "{w}/missing.yaml", "--model", "gpt2-tiny"], "missing.yaml"),
    (["plan", "--cluster", "{w}/broken.yaml", "--model", "gpt2-tiny"], "broken.yaml"),
    (["plan", "--cluster", "{w}/binary.yaml", "--model", "gpt2-tiny"], "binary.yaml"),
    (["plan", *P, "--seq", "0", "-o", "{w}/p.json"], "--seq"),
    (["plan", *P, "--seq", "-5", "-o", "{w}/p.json"], "--seq"),
    (["plan", *P, "--seq", "4096"], "--seq"),
    (["plan", *P, "--gap", "-1", "-o", "{w}/p.json"], "--gap"),
    (["plan", *P, "--gap", "nan"], "--gap"),
    (["plan", *P, "--time-limit", "0", "-o", "{w}/p.json"], "--time-limit"),
    (["plan", *P, "--time-limit", "-3"], "--time-limit"),
    (["plan", *P, "--global-batch", "0", "-o", "{w}/p.json"], "--global-batch"),
    (["plan", *P, "--global-batch", "abc"], "--global-batch"),
    (["plan", *P, "--schedule", "zigzag"], "--schedule"),
    (["plan", *P, "--bogus-flag"], "--bogus-flag"),
    (["plan", *P, "-o", "{w}/adir"], "--output"),
    (["plan", *P, "-o", "/proc/hetalloc-plan.json"], "--output"),
    (["plan", *P, "-o", "{w}/a-file/p.json"], "--output"),
    (["plan", *P, "-o", "/dev/null"], "--output"),
    (["plan", "--cluster", str(CLUSTER), "--model", "{w}/hf_neglayers.json", "-o", "{w}/p.json"], "hf_neglayers.json"),
    (["plan", "--cluster", str(CLUSTER), "--model", "{w}/hf_zeroheads.json"], "hf_zeroheads.json"),
    (["plan", "--cluster", str(CLUSTER), "--model", "{w}/hf_strhidden.json"], "hf_strhidden.json"),
    (["plan", "--cluster", str(CLUSTER), "--model", "{w}/hf_indivisible.json"], "hf_indivisible.json"),
    (["plan", "--cluster", str(CLUSTER), "--model", "{w}/hf_missing.json"], "hf_missing.json"),
    (["plan", "--cluster", str(CLUSTER), "--model", "gpt9"], "--model"),
    (["plan", *P, "--cost-graph", "{w}/cg_negparams.json", "-o", "{w}/p.json"], "cg_negparams.json"),
    (["plan", *P, "--cost-graph", "{w}/cg_negflops.json"], "cg_negflops.json"),
    (["plan", *P, "--cost-graph", "{w}/cg_nolayers.json"], "cg_nolayers.json"),
    (["plan", *P, "--cost-graph", "{w}/cg_negseq.json"], "cg_negseq.json"),
    (["plan", *P, "--cost-graph", "{w}/cg_badtable.json"], "cg_badtable.json"),
    (["plan", *P, "--cost-graph", "{w}/adir"], "--cost-graph"),
    (["plan", *P, "--cost-graph", "{w}/list.json"], "list.json"),
    (["plan", *P, "--efficiency", "{w}/adir"], "--efficiency"),
    (["plan", *P, "--efficiency", "{w}/broken.json"], "broken.json"),
    (["plan", *P, "--efficiency-as", "CPU=T4"], "--efficiency-as"),
    # simulate
    (["simulate", "{w}/baddev.json", "--report", "{w}/r.json"], "baddev.json"),
    (["simulate", "{w}/badsched.json", "--trace", "{w}/t.json"], "badsched.json"),
    (["simulate", "{w}/norep.json"], "norep.json"),
    (["simulate", "{w}/tpmixed.json"], "tpmixed.json"),
    (["simulate", "{w}/recompute.json"], "recompute.json"),
    (["simulate", "{w}/v1share.json"], "v1share.json"),
    (["simulate", "{w}/repdict.json"], "repdict.json"),
    (["simulate", "{w}/stagesint.json"], "stagesint.json"),
    (["simulate", "{w}/sharestr.json"], "sharestr.json"),
    (["simulate", "{w}/seqstr.json"], "seqstr.json"),
    (["simulate", "{w}/layersneg.json"], "layersneg.json"),
    (["simulate", "{w}/badcg_plan.json"], "badcg_plan.json"),
    (["simulate", "{w}/adir"], "adir"),
    (["simulate", "{w}/missing.json"], "missing.json"),
    (["simulate", "{w}/broken.json"], "broken.json"),
    (["simulate", "{w}/list.json"], "list.json"),
    (["simulate", "{w}/plan.json", "--bucket-mb", "0"], "--bucket-mb"),
    (["simulate", "{w}/plan.json", "--iterations", "0", "--report", "{w}/r.json"], "--iterations"),
    (["simulate", "{w}/plan.json", "--trace", "/proc/hetalloc-trace.json"], "--trace"),
    (["simulate", "{w}/plan.json", "--gantt", "{w}/adir"], "--gantt"),
    (["simulate", "{w}/plan.json", "--report", "/proc/hetalloc-report.json", "--trace", "{w}/t.json"], "--report"),
    (["simulate", "{w}/plan.json", "--utilisation", "{w}/a-file/u.png"], "--utilisation"),
    (["simulate", "{w}/plan.json", "--cluster", "{w}/adir"], "--cluster"),
    (["simulate", "{w}/plan.json", "--report", "{w}/plan.json"], "--report"),
    (["simulate", "{w}/plan.json", "--trace", "{w}/t.json", "--report", "{w}/t.json"], "--report"),
    (["simulate", "{w}/plan.json", "--cluster", "{w}/one-cpu.yaml"], "plan.json"),
    (["simulate", "{w}/plan.json", "--cost-graph", "{w}/cg_fewer.json"], "plan.json"),
    (["simulate", "{w}/plan.json", "--cost-graph", "{w}/cg_negparams.json"], "cg_negparams.json"),
    # whatif
    (["whatif", "{w}/baddev.json", "--batch", "16"], "baddev.json"),
    (["whatif", "{w}/norep.json", "--batch", "16"], "norep.json"),
    (["whatif", "{w}/plan.json"], "--swap"),
    (["whatif", "{w}/plan.json", "--batch", "-3"], "--batch"),
    (["whatif", "{w}/plan.json", "--seq", "0"], "--seq"),
    (["whatif", "{w}/plan.json", "--swap", "garbage"], "--swap"),
    (["whatif", "{w}/plan.json", "--remove", "5xH100", "--chart", "{w}/c.png"], "--remove"),
    (["whatif", "{w}/plan.json", "--slow", "host/9=2"], "--slow"),
    (["whatif", "{w}/plan.json", "--slow", "host/0=-2"], "--slow"),
    (["whatif", "{w}/plan.json", "--fail", "host/9"], "--fail"),
    (["whatif", "{w}/plan.json", "--fail", "host"], "fail host"),
    (["whatif", "{w}/plan.json", "--link", "nic=abc"], "--link"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--time-limit", "0"], "--time-limit"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--chart", "/proc/hetalloc-chart.png"], "--chart"),
    (["whatif", "{w}/plan.json", *SWEEP, "--plot", "/proc/hetalloc-plot.png"], "--plot"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--plot", "{w}/plot.png"], "--plot"),
    (["whatif", "{w}/plan.json", "--sweep", "garbage"], "--sweep"),
    (["whatif", "{w}/plan.json", "--sweep", "batch=1.2.3"], "--sweep"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--planner", "foo"], "--planner"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--price", "CPU=-1"], "--price"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--steps", "0"], "--steps"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--deadline", "5"], "--deadline"),
    (["whatif", "{w}/plan.json", "--batch", "16", "--bucket-mb", "-1"], "--bucket-mb"),
    # demo
    (["demo", "--out", "/proc/hetalloc-demo"], "--out"),
    (["demo", "--out", "{w}/a-file"], "--out"),
    (["demo", "--out", "{w}/demo", "--model", "gpt9"], "--model"),
    (["demo", "--out", "{w}/demo", "--global-batch", "0"], "--global-batch"),
    (["demo", "--out", "{w}/demo", "--time-limit", "0"], "--time-limit"),
    # profile: refused before any rank starts
    (["profile", "--out", "{w}/prof", "--nproc", "0"], "--nproc"),
    (["profile", "--out", "{w}/prof", "--seq", "0"], "--seq"),
    (["profile", "--out", "{w}/prof", "--seq", "4096"], "--seq"),
    (["profile", "--out", "{w}/prof", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["profile", "--out", "{w}/prof", "--batch-sizes", "0"], "--batch-sizes"),
    (["profile", "--out", "{w}/prof", "--model", "gpt9"], "--model"),
    (["profile", "--out", "{w}/prof", "--model", "{w}/hf_zeroheads.json"], "hf_zeroheads.json"),
    (["profile", "--out", "/proc/hetalloc-profile"], "--out"),
    (["profile", "--out", "{w}/prof", "--slowdown", "1=0.5"], "--slowdown"),
    (["profile", "--out", "{w}/prof", "--slowdown", "5=2"], "--slowdown"),
    (["profile", "--out", "{w}/prof", "--warmup", "-1"], "--warmup"),
    (["profile", "--out", "{w}/prof", "--repeats", "0"], "--repeats"),
    (["profile", "--out", "{w}/prof", "--link-repeats", "0"], "--link-repeats"),
    # run: refused in the launching process, nothing launched
    (["run", "{w}/plan.json", "--out", "{w}/run", "--steps", "0"], "--steps"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--slowdown", "5=2"], "--slowdown"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--slowdown", "host/9=2"], "--slowdown"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--slowdown", "1=0.5"], "--slowdown"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--slowdown", "1"], "--slowdown"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--resume"], "--resume"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--checkpoint-every", "2"], "--checkpoint-every"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--checkpoint-dir", "{w}/ck", "--checkpoint-every", "-1"],
     "--checkpoint-every"),
    (["run", "{w}/plan.json", "--out", "/proc/hetalloc-run"], "--out"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--checkpoint-dir", "{w}/a-file"], "--checkpoint-dir"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--checkpoint-dir", "{w}/ckpt-other", "--resume"], "latest.json"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--model", "gpt2-small"], "--model"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--model", "gpt9"], "--model"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--model", "{w}/hf_neglayers.json"], "hf_neglayers.json"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--lr", "0"], "--lr"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--eval-every", "-1"], "--eval-every"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--val-fraction", "1"], "--val-fraction"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--dataset", "{w}/missing-corpus.txt"], "missing-corpus.txt"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--max-restarts", "-1"], "--max-restarts"),
    (["run", "{w}/plan.json", "--out", "{w}/run", "--nodes-print", "--master-port", "70000"], "--master-port"),
    (["run", "{w}/baddev.json", "--out", "{w}/run"], "baddev.json"),
    (["run", "{w}/sharestr.json", "--out", "{w}/run"], "sharestr.json"),
    (["run", "{w}/gpu-plan.json", "--out", "{w}/run"], "gpu-plan.json"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check_one_line(rc: int, out: str, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err + out


def test_enough_cases_across_all_verbs():
    verbs = {argv[0] for argv, _ in CASES}
    assert verbs == {"plan", "simulate", "whatif", "demo", "profile", "run"}
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(argv, needle, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    before = _tree(work)
    rc = main([a.replace("{w}", str(work)) for a in argv])
    cap = capsys.readouterr()
    _check_one_line(rc, cap.out, cap.err, needle)
    assert _tree(work) == before  # no output file, folder or temporary left behind


def _cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hetalloc.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_process_refuses_before_launching(work):
    """As a user runs it: the launching process refuses, no torchrun starts."""
    before = _tree(work)
    p = _cli(["run", "plan.json", "--out", "run", "--slowdown", "5=2"], work)
    _check_one_line(p.returncode, p.stdout, p.stderr, "--slowdown: 5: is not a rank of this run (0..1)")
    p = _cli(["simulate", "baddev.json", "--trace", "t.json"], work)
    _check_one_line(p.returncode, p.stdout, p.stderr, "baddev.json: replicas[0].stages[0].groups[0].devices[0]")
    assert _tree(work) == before


@pytest.mark.slow
def test_a_rank_side_mistake_is_one_line_without_torchruns_report(work):
    """A mistake only the ranks can see (latest.json names a step whose checkpoint is
    missing): the ranks say it in one line; torchrun's failure report (a ChildFailedError
    traceback, 30-odd lines) is held back by the launching process."""
    ck = work / "ckpt-missing-step"
    ck.mkdir()
    (ck / "latest.json").write_text(json.dumps({"step": 5, "plan_key": None, "world_size": 2}))
    before = _tree(work)
    p = _cli(["run", "plan.json", "--out", "run-missing", "--steps", "2", "--checkpoint-dir", ck.name, "--resume"],
             work, timeout=300)
    _check_one_line(p.returncode, p.stdout, p.stderr, f"{ck.name}/latest.json names step 5")
    assert "ChildFailedError" not in p.stderr and "step:" not in p.stdout
    assert _tree(work) == before
    shutil.rmtree(ck)
