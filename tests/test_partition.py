"""Tensor-parallel partitioning: per-rank shapes, collective placement and vocabulary
shards, and the ranks' combined logits against the single-rank engine (ranks run as threads
here; tests/test_distributed_runtime.py runs them as processes)."""

from __future__ import annotations

import json

import pytest
import torch

from llm_engine.builder.errors import BuildError
from tests.harness import PagedRunner, ThreadGroup

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 120, 33], [250, 11, 2, 87, 45, 19, 100, 64, 3]]


@pytest.fixture(scope="module")
def tp_engines(built):
    return lambda arch, tp, **options: built(arch, tp=tp, **options)


def _plan(path, rank):
    return json.loads((path / f"plan.rank{rank}.json").read_text())


def _nodes(plan, op):
    return [n for n in plan["nodes"] if n["op"] == op]


def _rank_logits(path, tp, steps):
    """Teacher-forced logits of every step, from all ranks running together."""
    group = ThreadGroup(tp)

    def run(rank):
        runner = PagedRunner(path, rank=rank, comm=group.comm(rank))
        return [runner.step(work) for work in steps]

    return group.run(run)


def _steps():
    """Two prompts prefilled in chunks while a third decodes: mixed prefill/decode batches."""
    return [
        [(0, PROMPTS[0][:4]), (1, PROMPTS[1])],
        [(0, PROMPTS[0][4:]), (1, [9]), (2, PROMPTS[2][:5])],
        [(0, [13]), (1, [21]), (2, PROMPTS[2][5:])],
        [(0, [77]), (1, [5]), (2, [6])],
    ]


def test_heads_kv_replication_and_collectives(tp_engines):
    # SmolLM2's attention shape: 9 query heads over 3 KV heads; tp=2 deals 5+4 query heads,
    # and KV head 1 serves both ranks.
    path = tp_engines("llama_tied", 2)
    meta = json.loads((path / "engine.json").read_text())
    assert meta["ranks"] == 2 and meta["parallel"] == {"tp": 2, "pp": 1}
    ranks = [_plan(path, r) for r in range(2)]
    for rank, plan in enumerate(ranks):
        attn = _nodes(plan, "paged_attention")
        assert {a["attrs"]["num_heads"] for a in attn} == {(5, 4)[rank]}
        assert {a["attrs"]["num_kv_heads"] for a in attn} == {2}
        assert attn[0]["attrs"]["kv_head_map"] == ([0, 0, 0, 1, 1], [0, 1, 1, 1])[rank]
        assert {layer["num_kv_heads"] for layer in plan["kv_cache"]["layers"]} == {2}
        n_layers = len(attn)
        # o_proj and down_proj of every layer, plus the vocabulary-split embedding.
        assert len(_nodes(plan, "all_reduce")) == 2 * n_layers + 1
        gather = _nodes(plan, "all_gather")
        assert len(gather) == 1 and plan["outputs"] == [gather[0]["name"]]
        by_name = {n["name"]: n for n in plan["nodes"]}
        for ar in _nodes(plan, "all_reduce"):
            assert by_name[ar["inputs"][0]]["op"] in ("linear", "embedding")
    w0 = json.loads((path / "report.json").read_text())["partition"]["ranks"]
    assert w0[0]["weight_bytes"] > w0[1]["weight_bytes"] > 0  # rank 0 has one more head


def test_vocab_not_divisible(tp_engines, checkpoints):
    path = tp_engines("llama", 3)
    plans = [_plan(path, r) for r in range(3)]
    vocab = json.loads((path / "engine.json").read_text())["generation"]["vocab_size"]
    assert vocab % 3, "the test needs a vocabulary that 3 does not divide"
    shard = -(-vocab // 3)
    starts = []
    for plan in plans:
        emb = _nodes(plan, "embedding")[0]
        starts.append((emb["attrs"]["vocab_start"], emb["attrs"]["vocab_end"]))
        assert plan["weights"]["model.embed_tokens.weight"]["shape"][0] == shard
        assert _nodes(plan, "all_gather")[0]["attrs"]["size"] == vocab
    assert starts == [(0, shard), (shard, 2 * shard), (2 * shard, vocab)]


@pytest.mark.parametrize("arch,tp", [("llama_tied", 2), ("llama", 3), ("qwen2", 2),
                                     ("gpt2", 2), ("mistral", 2), ("mixtral", 2),
                                     ("qwen2_moe", 2)])
def test_ranks_match_single_rank(tp_engines, arch, tp):
    """MoE: attention and the shared expert split by heads / channels, each expert's
    intermediate channels split, the router on every rank."""
    one = PagedRunner(tp_engines(arch, 1))
    want = [one.step(work) for work in _steps()]
    got = _rank_logits(tp_engines(arch, tp), tp, _steps())
    for rank_steps in got:
        for w, g in zip(want, rank_steps):
            for sid in w:
                torch.testing.assert_close(g[sid], w[sid], rtol=1e-4, atol=1e-4)


def test_greedy_identical(tp_engines):
    want = PagedRunner(tp_engines("llama_tied", 1)).greedy(PROMPTS, 8)
    group = ThreadGroup(2)
    path = tp_engines("llama_tied", 2)
    got = group.run(lambda r: PagedRunner(path, rank=r, comm=group.comm(r)).greedy(PROMPTS, 8))
    assert got[0] == got[1] == want


@pytest.mark.parametrize("quant,tol", [("int8-wo", 1e-4), ("int4-gptq", 1e-4), ("fp8", 1e-4),
                                       ("int8-sq", 3e-2), ("fp8-per-token", 8e-2),
                                       ("fp8-group", 1e-4)])
def test_quantized_ranks_match(tp_engines, quant, tol):
    # Splits take whole rows and whole int4 groups, so the shards hold exactly the codes and
    # scales of the single-rank engine: only summation order differs (fp8's activation scale
    # is static). int8-sq's and fp8-per-token's per-token activation scales are taken per shard
    # (each rank's amax over its slice of the o_proj/down input), so their logits differ by
    # quantization noise (e4m3 rounds each value by up to 6%, int8 by less).
    # fp8-group's scales are per group, and the shards fall on group boundaries: each rank
    # quantizes exactly what one rank does.
    # Group 12 puts the 3-head (36-channel) o_proj shards on group boundaries. int8-sq's
    # default rotation is online on one rank and offline (its fallback) on two: pin it.
    options = {"int4-gptq": {"quant": quant, "group_size": 12},
               "int8-sq": {"quant": quant, "rotation": "offline"},
               "fp8-per-token": {"quant": "fp8", "fp8_act_scales": "per-token"},
               "fp8-group": {"quant": "fp8", "fp8_act_scales": "per-token-group",
                             "group_size": 32},
               }.get(quant, {"quant": quant})
    arch = "llama_wide" if quant == "fp8-group" else "llama"  # widths 32 divides
    one = PagedRunner(tp_engines(arch, 1, **options))
    want = [one.step(work) for work in _steps()]
    got = _rank_logits(tp_engines(arch, 2, **options), 2, _steps())
    for w, g in zip(want, got[0]):
        for sid in w:
            torch.testing.assert_close(g[sid], w[sid], rtol=tol, atol=tol)


def test_fp8_group_split_off_group_boundaries(tp_engines):
    """llama_wide's o_proj has 128 inputs, one group of 128 at the default size: two ranks'
    64-channel shares would split it, which the partitioner refuses with the fix."""
    with pytest.raises(BuildError, match=r"do not fall on fp8 activation group boundaries "
                       r"\(group size 128\); rebuild with a --group-size"):
        tp_engines("llama_wide", 2, quant="fp8", fp8_act_scales="per-token-group")


def test_bf16_ranks_close(tp_engines):
    one = PagedRunner(tp_engines("llama_tied", 1, dtype="bfloat16"))
    want = [one.step(work) for work in _steps()]
    got = _rank_logits(tp_engines("llama_tied", 2, dtype="bfloat16"), 2, _steps())
    for w, g in zip(want, got[0]):
        for sid in w:
            torch.testing.assert_close(g[sid].float(), w[sid].float(), rtol=0.05, atol=0.05)


def test_errors(tp_engines):
    from llm_engine.builder.errors import BuildError

    with pytest.raises(BuildError, match="exceeds the model's 9 attention heads"):
        tp_engines("llama_tied", 10)
    with pytest.raises(BuildError, match="--tp must be a positive integer"):
        tp_engines("llama", 0)
    with pytest.raises(BuildError, match=r"do not fall on int4 group boundaries.*--group-size"):
        tp_engines("llama", 2, quant="int4-gptq", group_size=8)


@pytest.mark.parametrize("args,fragment", [(["--tp", "0"], "--tp must be a positive integer"),
                                           (["--pp", "0"], "--pp must be a positive integer"),
                                           (["--tp", "64"], "exceeds the model's")])
def test_build_parallel_bad_options(checkpoints, tmp_path, args, fragment):
    from click.testing import CliRunner

    from llm_engine.builder.cli import main
    from tests.cli_util import one_line_error

    ckpt, _ = checkpoints("llama")
    result = CliRunner().invoke(main, ["build", "--model", str(ckpt), "--output",
                                       str(tmp_path / "e"), *args])
    if args[0] == "--tp" and args[1] != "0":
        # found by the partition pass, after the build's progress lines: the last line
        assert result.exit_code == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last, last
    else:
        one_line_error(result, fragment)  # refused before any work
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_attention_tp_refuses_what_it_cannot_split(checkpoints, tmp_path, arch):
    """gpt-oss (RoPE'd q/k concatenated back) and DeepSeek's MLA (K built from two halves)
    reach attention through a concatenation, not a projection: --tp refuses in one line."""
    from llm_engine.builder.errors import BuildError
    from tests.models import build_tiny_engine

    ckpt, _ = checkpoints(arch)
    with pytest.raises(BuildError, match=r"tensor parallelism: attention input .* not from "
                                         r"a projection"):
        build_tiny_engine(ckpt, tmp_path / "engine", tp=2)
