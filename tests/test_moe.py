"""The mixture-of-experts reference ops against a dense formula, and the trace of a MoE
block: router in ordinary ops, experts in one `moe` node (HF-match for whole MoE models is
in test_hf_match.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_engine.kernels.ops import OPS


def _dense(x, index, weights, gate_up, down):
    """Every expert on every token, weighted by the router's (zero elsewhere)."""
    route = torch.zeros(x.shape[0], gate_up.shape[0]).scatter(1, index, weights)
    h = torch.einsum("th,eih->eti", x, gate_up)
    gate, up = h[..., 0::2], h[..., 1::2]  # interleaved rows
    y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down)
    return (y * route.t()[..., None]).sum(0)


@pytest.mark.parametrize("tokens, experts, k", [(1, 4, 1), (9, 4, 2), (33, 8, 3)])
def test_moe_reference_matches_dense(tokens, experts, k):
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 16, 24
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    index = OPS["topk"].fn(logits.softmax(-1), k=k, dim=-1)
    weights = OPS["gather"].fn(logits.softmax(-1), index, dim=-1)
    torch.testing.assert_close(weights, torch.topk(logits.softmax(-1), k).values)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3
    down = torch.randn(experts, hidden, inter, generator=g) * 0.3
    got = OPS["moe"].fn(x, index, weights, gate_up, down, act="silu")
    torch.testing.assert_close(got, _dense(x, index, weights, gate_up, down),
                               atol=1e-5, rtol=1e-5)


def test_moe_reference_checks_its_activation():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        OPS["moe"].fn(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                      torch.zeros(1, 8, 4), torch.zeros(1, 4, 4), act="os.system")


def test_moe_block_traces_to_one_moe_node_per_layer(graphs):
    g, _ = graphs("mixtral")
    ops = [n.op for n in g.nodes()]
    assert ops.count("moe") == 2 and ops.count("topk") == 2  # one per layer
    moe = next(n for n in g.nodes() if n.op == "moe")
    assert moe.attrs == {"act": "silu"}
    assert g.node(moe.inputs[3]).shape == (4, 2 * 160, 64)  # [experts, 2 * inter, hidden]


def test_report_has_experts_and_measured_routing(checkpoints, tmp_path):
    """report.json -> moe: each layer's experts and top-k, and the share of routed tokens
    per expert measured on calibration text (here token ids: the tiny model has no
    tokenizer)."""
    import json
    import random

    from tests.models import build_tiny_engine

    rng = random.Random(0)
    calib = tmp_path / "ids.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": [rng.randrange(320) for _ in range(128)]})
                             + "\n" for _ in range(4)))
    ckpt, _ = checkpoints("mixtral")
    path = build_tiny_engine(ckpt, tmp_path / "engine", calib_data=str(calib))
    moe = json.loads((path / "report.json").read_text())["moe"]
    assert [(la["experts"], la["top_k"], la["gate"]) for la in moe["layers"]] == \
        [(4, 2, "silu")] * 2
    assert moe["routing"]["measured"] and moe["routing"]["tokens"] == 256
    for layer in moe["layers"]:
        assert sum(layer["routed_share"]) == pytest.approx(1.0, abs=1e-3)
    assert moe["routing"]["max_over_mean_load"]["worst_layer"] >= 1.0


def test_report_says_why_routing_was_not_measured(engines):
    import json

    moe = json.loads((engines("qwen3_moe") / "report.json").read_text())["moe"]
    assert moe["routing"]["measured"] is False and "tokenizer" in moe["routing"]["reason"]
    dense = json.loads((engines("llama") / "report.json").read_text())
    assert "moe" not in dense


def test_mla_values_are_padded_to_the_key_head_size(engines):
    """DeepSeek's MLA has values smaller than keys (128 against 192 in the real model; 16
    against 24 here): the values are padded into the one-head-size cache and the attention
    output sliced back (the HF-match tests check the tokens)."""
    import json

    engine = engines("deepseek_v3")
    ops = [n["op"] for n in json.loads((engine / "plan.rank0.json").read_text())["nodes"]]
    layers = json.loads((engine / "engine.json").read_text())["kv_cache"]["layers"]
    assert ops.count("pad") == len(layers) and {lay["head_dim"] for lay in layers} == {24}


def test_values_larger_than_keys_fail_in_one_line(tmp_path):
    import transformers as T

    from llm_engine.builder.errors import BuildError
    from tests.models import build_tiny_engine

    cfg = T.DeepseekV3Config(vocab_size=320, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=32,
                             first_k_dense_replace=1, pad_token_id=0)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(BuildError, match="values of head size 32 over keys of 16"):
        build_tiny_engine(tmp_path / "ckpt", tmp_path / "engine")


@pytest.mark.slow
def test_moe_int4_engine_passes_the_quality_gates(checkpoints, tmp_path):
    """A MoE model under --quant int4-awq goes through the same calibration and gates as a
    dense one (experts int4 from their own calibration rows, router and attention GEMMs as
    for dense models), and keeps its fast-path graph."""
    import json
    import random

    from tests.models import build_tiny_engine

    rng = random.Random(1)
    calib = tmp_path / "ids.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": [rng.randrange(320) for _ in range(128)]})
                             + "\n" for _ in range(8)))
    ckpt, _ = checkpoints("mixtral")
    path = build_tiny_engine(ckpt, tmp_path / "engine", quant="int4-awq", calib_data=str(calib),
                             calib_samples=4, calib_seq_len=64, calib_cache=None,
                             max_ppl_increase=5.0, min_greedy_agreement=0.7)
    report = json.loads((path / "report.json").read_text())
    gates = report["quantization"]["gates"]
    assert gates["failed"] == [] and gates["max_ppl_increase"] == 5.0
    assert report["quantization"]["quality"]["greedy_agreement"] >= 0.7
    assert report["onnx"]["written"] is True
    assert {e["format"] for e in report["quantization"]["experts"].values()} == {"int4_group"}


def test_llama4_context_past_its_attention_chunk_fails_in_one_line(checkpoints, tmp_path):
    """Within one chunk Llama 4's chunked layers are causal (what the engine computes); a
    longer context would need chunked attention: refused, naming the fix."""
    from llm_engine.builder.errors import BuildError
    from tests.models import build_tiny_engine

    ckpt, _ = checkpoints("llama4")
    with pytest.raises(BuildError, match=r"--max-seq-len 9000 exceeds the model's attention "
                                         r"chunk \(8192 tokens\).*--max-seq-len 8192 or less"):
        build_tiny_engine(ckpt, tmp_path / "engine", max_seq_len=9000)
