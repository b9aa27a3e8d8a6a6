"""Cost graphs: analytic sizes, measured tables (interpolation/extrapolation), round trip."""

import json

import pytest

from hetalloc.catalog import DEVICE_TYPES
from hetalloc.costgraph import TimeTable, analytic_cost_graph, cost_graph_from_dict, load_cost_graph
from hetalloc.errors import SpecError
from hetalloc.models import MODELS, get_model, shape_from_hf_config

A100 = DEVICE_TYPES["A100-80G"]


def test_gpt2_small_sizes():
    cg = analytic_cost_graph(get_model("gpt2-small"))
    assert cg.num_layers == 14
    assert [l.kind for l in cg.layers[:2]] == ["embedding", "block"]
    # 124M parameters with tied embeddings; the head is a separate copy here (+38.6M)
    assert cg.total_params == pytest.approx(124.4e6 + 38.6e6, rel=0.01)
    assert cg.layers[1].params == 7_087_872  # 12h^2 + 13h with h = 768, as transformers' GPT2Block


@pytest.mark.parametrize("name, billions", [("gpt3-1.3b", 1.3), ("gpt3-2.7b", 2.7), ("gpt3-6.7b", 6.7),
                                            ("gpt3-13b", 13), ("gpt3-175b", 175), ("llama2-7b", 6.7),
                                            ("llama2-13b", 13), ("llama2-70b", 69), ("bert-large", 0.335)])
def test_published_sizes(name, billions):
    cg = analytic_cost_graph(get_model(name))
    head = cg.layers[-1].params if MODELS[name].family != "bert" else 0
    assert (cg.total_params - head) / 1e9 == pytest.approx(billions, rel=0.06)


def test_analytic_time_scales_with_batch_and_saturates():
    cg = analytic_cost_graph(get_model("gpt2-small"))
    f1, b1 = cg.range_time(1, 13, A100, 1)
    f8, b8 = cg.range_time(1, 13, A100, 8)
    assert b1 == pytest.approx(2 * f1, rel=0.1)  # backward: twice the FLOPs, same launch overhead
    assert f1 < f8 < 8 * f1  # per-sample efficiency improves with the micro-batch


def test_measured_table_interpolation():
    t = TimeTable([2, 4, 8], [[2.0, 3.0, 5.0]], [[4.0, 6.0, 10.0]])
    assert t.at(0, 3) == (2.5, 5.0)          # between: linear
    assert t.at(0, 1) == (1.0, 2.0)          # below: proportional to the smallest size
    assert t.at(0, 10) == (6.0, 12.0)        # above: slope of the last segment
    noisy = TimeTable([1, 2, 4], [[1.0, 0.9, 2.0]], [[1.0, 1.0, 1.0]])
    assert noisy.fwd_s[0] == [1.0, 1.0, 2.0]  # made monotone
    single = TimeTable([4], [[2.0]], [[4.0]])
    assert single.at(0, 8) == (4.0, 8.0)


def test_measured_tables_override_analytic_and_round_trip(tmp_path):
    cg = analytic_cost_graph(get_model("gpt2-tiny"), precision="fp32")
    L = cg.num_layers
    t = TimeTable([1, 2], [[0.1 * (i + 1), 0.2 * (i + 1)] for i in range(L)],
                  [[0.2 * (i + 1), 0.4 * (i + 1)] for i in range(L)], meta={"repeats": 5})
    m = cg.with_tables({"CPU": t})
    cpu = DEVICE_TYPES["CPU"]
    assert m.range_time(0, 2, cpu, 2) == pytest.approx((0.2 + 0.4, 0.4 + 0.8))
    assert m.source_of(cpu) == "measured" and m.source_of(A100) == "analytic"
    p = tmp_path / "cg.json"
    m.save(p)
    back = load_cost_graph(p)
    assert back.fingerprint() == m.fingerprint()
    assert back.range_time(0, 2, cpu, 3) == pytest.approx(m.range_time(0, 2, cpu, 3))


def test_cost_graph_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON"):
        load_cost_graph(p)
    d = analytic_cost_graph(get_model("gpt2-tiny")).to_dict()
    d["tables"] = {"CPU": {"batch_sizes": [1], "fwd_s": [[1.0]], "bwd_s": [[1.0]]}}
    with pytest.raises(SpecError, match="tables.CPU"):
        cost_graph_from_dict(json.loads(json.dumps(d)), "x.json")


def test_hf_config_shapes():
    gpt2 = shape_from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                                 "vocab_size": 50257, "n_positions": 1024}, "gpt2")
    assert (gpt2.family, gpt2.hidden, gpt2.ffn) == ("gpt", 768, 3072)
    llama = shape_from_hf_config({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "intermediate_size": 14336, "vocab_size": 128256}, "l3")
    assert llama.kv_hidden == 1024
