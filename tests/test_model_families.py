"""Model families from Hugging Face configs (Llama, Mistral, Qwen2, OPT; GPT-2 and BERT),
in one process: the planner's per-layer parameter counts are the real layers' counts,
the runtime's cut (blocks called one by one, rotary cos/sin and masks per stage) computes
what the whole transformers model computes, and a plan carries its model's config so the
runtime needs no --model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from hetalloc.cluster import load_cluster
from hetalloc.errors import SpecError
from hetalloc.models import get_model, layer_shapes, resolve_model, shape_from_dict, shape_from_hf_config
from hetalloc.plan import load_plan, plan_context
from runtime.models import TENSOR_PARALLEL_PLAN, StageModule, build_model, layer_param_counts
from runtime.plans import cpu_cost_graph, hand_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "opt-tiny"]
MODELS = [str(ROOT / "examples" / f"{n}.json") for n in EXAMPLES] + ["gpt2-tiny", "bert-tiny"]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: Path(m).stem)
def test_cost_graph_counts_every_layer_exactly(model):
    shape = resolve_model(model)
    built = build_model(shape, seed=0)
    counts = layer_param_counts(built)
    assert counts == [l.params for l in layer_shapes(shape, 32, 4)]
    assert sum(counts) == sum(p.numel() for p in built.model.parameters())  # the cut owns every parameter


@pytest.mark.parametrize("model, cuts", [(MODELS[0], [0, 1, 4, 6]), (MODELS[1], [0, 3, 6]), (MODELS[2], [0, 2, 5, 6]),
                                         (MODELS[3], [0, 1, 3, 6])], ids=EXAMPLES)
def test_stages_chained_compute_the_whole_transformers_model(model, cuts):
    """float64, sequence 48: longer than Mistral's 16-token sliding window."""
    shape = resolve_model(model)
    built = build_model(shape, seed=0, dtype=torch.float64)
    stages = [StageModule(built, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    ids = torch.randint(shape.vocab, (3, 48), generator=torch.Generator().manual_seed(0))
    x = ids
    for s in stages:
        x = s(x)
    ref = built.logits(ids)
    assert (x - ref).abs().max() <= 1e-12 * ref.abs().max()
    names = [n for s in stages for n, _ in s.named_model_parameters()]
    assert sorted(names) == sorted(n for n, _ in built.model.named_parameters())


def test_sliding_window_mask_is_applied_per_stage():
    """Mistral's window matters at this length: without it the cut would differ."""
    shape = resolve_model(str(ROOT / "examples" / "mistral-tiny.json"))
    built = build_model(shape, seed=0, dtype=torch.float64)
    ids = torch.randint(shape.vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = built.logits(ids)
    for layer in built.layers[1:-1]:
        assert layer.window == 16
        layer.window = None
    x = ids
    for layer in built.layers:
        x = layer(x)
    assert (x - ref).abs().max() > 1e-3


# Only the keys a shape needs: the defaults hetalloc assumes for the rest must be the ones
# transformers' config classes assume (the real model is built from the same dict).
MINIMAL = {
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 48, "vocab_size": 64, "attention_bias": True},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 16,
                "intermediate_size": 48, "vocab_size": 64, "head_dim": 16},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 64,
              "intermediate_size": 48, "vocab_size": 64, "head_dim": 4},
    "opt": {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 64, "word_embed_proj_dim": 16, "do_layer_norm_before": False},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 64},
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 48, "vocab_size": 64, "id2label": {"0": "a", "1": "b", "2": "c"}},
}


@pytest.mark.parametrize("model_type", list(MINIMAL))
def test_config_defaults_agree_with_transformers(model_type):
    shape = shape_from_hf_config(MINIMAL[model_type], model_type)
    counts = layer_param_counts(build_model(shape, seed=0))
    assert counts == [l.params for l in layer_shapes(shape, 16, 4)]


def test_published_llama2_sizes_are_exact():
    """Parameter counts of meta-llama/Llama-2-7b-hf and -70b-hf (untied heads, as they are)."""
    assert sum(l.params for l in layer_shapes(get_model("llama2-7b"), 128, 2)) == 6_738_415_616
    assert sum(l.params for l in layer_shapes(get_model("llama2-70b"), 128, 2)) == 68_976_648_192


@pytest.mark.parametrize("cfg, field", [
    ({"model_type": "falcon"}, "model_type"),
    ({"hidden_size": 64}, "model_type"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "vocab_size": 64}, "intermediate_size"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 3, "intermediate_size": 64, "vocab_size": 64}, "num_key_value_heads"),
    ({"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64,
      "enable_bias": False}, "enable_bias"),
])
def test_bad_configs_are_one_line_naming_the_field(tmp_path, cfg, field):
    path = tmp_path / "my.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SpecError) as e:
        resolve_model(str(path))
    assert str(e.value).startswith(f"{path}: {field}:") and "\n" not in str(e.value)
    with pytest.raises(SpecError, match="file not found"):
        resolve_model(str(tmp_path / "missing.json"))


def test_plan_records_the_config_and_the_runtime_builds_from_it(tmp_path):
    """A plan made from a config file is self-contained: the config can be gone."""
    config = tmp_path / "qwen2-tiny.json"
    shutil.copy(ROOT / "examples" / "qwen2-tiny.json", config)
    shape = resolve_model(str(config))
    assert shape.name == "qwen2-tiny" and shape.hf_config == json.loads(config.read_text())
    plan = hand_plan(load_cluster(ROOT / "examples" / "cpu-4.yaml"), cpu_cost_graph(str(config), 32),
                     [[((0, 3), [("host/0", 1)]), ((3, 6), [("host/1", 1)])]], num_microbatches=2)
    plan.save(tmp_path / "plan.json")
    config.unlink()
    again = plan_context(load_plan(tmp_path / "plan.json"))[1].shape()
    assert again == shape and again.hf_config == shape.hf_config
    assert shape_from_dict(json.loads(json.dumps(shape.to_dict()))) == shape
    a = layer_param_counts(build_model(again, seed=0))
    assert a == [l.params for l in plan_context(plan)[1].layers]


def test_tensor_parallel_plan_names_linear_projections_of_stage_blocks():
    shape = resolve_model(str(ROOT / "examples" / "llama-tiny.json"))
    stage = StageModule(build_model(shape, seed=0), 2, 5)
    assert len(stage.blocks()) == 3
    for block in stage.blocks():
        for name in TENSOR_PARALLEL_PLAN["llama"]:
            assert isinstance(block.get_submodule(name), nn.Linear), name


@pytest.mark.parametrize("name, extra", [("llama-tiny", {}), ("qwen2-tiny", {}),
                                         ("llama-tiny", {"attention_bias": True, "mlp_bias": True})],
                         ids=["llama", "qwen2-qkv-bias", "llama-attention-and-mlp-bias"])
def test_replicated_params_are_what_the_tensor_parallel_plan_leaves_whole(tmp_path, name, extra):
    """The planner's per-rank parameters under tensor parallelism agree with the runtime's
    plan: ColwiseParallel shards a projection's weight and bias, RowwiseParallel its
    weight only (its bias stays whole), the rest of a block (the RMSNorms) stays whole."""
    cfg = {**json.loads((ROOT / "examples" / f"{name}.json").read_text()), **extra}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    shape = resolve_model(str(tmp_path / f"{name}.json"))
    block = build_model(shape, seed=0).layers[1].block
    split = 0
    for mod_name, style in TENSOR_PARALLEL_PLAN["llama"].items():
        lin = block.get_submodule(mod_name)
        split += lin.weight.numel() + (lin.bias.numel() if style == "colwise" and lin.bias is not None else 0)
    whole = sum(p.numel() for p in block.parameters()) - split
    assert layer_shapes(shape, 32, 4)[1].replicated_params == whole
    assert whole == 2 * shape.hidden + (2 * shape.hidden if extra else 0)  # norms (+ o_proj, down_proj biases)
