"""runtime.evaluate and `engine eval`: perplexity against HF logits on the same windows, KL and
greedy agreement between engines, the builtin text, and bad input as one line `error: ...`,
exit 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from llm_engine.builder.cli import main
from llm_engine.runtime import Engine
from llm_engine.runtime.evaluate import builtin_text, evaluate, perplexity, token_logprobs, windows
from tests.cli_util import one_line_error

KV = ["--kv-cache-memory", "4MiB"]
WINDOW = 128


@pytest.fixture(scope="module")
def engine_dir(engines) -> Path:
    return engines("llama")


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.load(engine_dir, kv_cache_memory=1 << 20)


@pytest.fixture(scope="module")
def ids(engine) -> list[int]:
    # ~700 tokens: five full windows of 128 and a partial last one.
    return engine.tokenizer.encode(builtin_text(900), add_special_tokens=False)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of an engine dir with engine.json changed (it is not among the checksummed
    files), to make engines without a tokenizer or with another vocab size cheaply."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "engine.json").read_text())
    edit(meta)
    (dst / "engine.json").write_text(json.dumps(meta))
    return dst


def _eval(*args) -> object:
    return CliRunner().invoke(main, ["eval", *map(str, args)])



# ---- library ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,window,stride", [(10, 4, 4), (9, 4, 4), (10, 4, 2), (10, 4, 1),
                                             (5, 8, 8), (2, 2, 2), (7, 3, 2)])
def test_windows_score_each_reachable_target_once(n, window, stride):
    targets = []
    for start, end, first in windows(n, window, stride):
        assert end - start <= window and start < first < end <= n
        targets += range(first, end)
    assert targets == sorted(set(targets))
    if stride == window:  # non-overlapping: the first token of each window is not a target
        assert targets == [t for t in range(1, n) if t % window != 0]
    else:  # sliding: every token but the first
        assert targets == list(range(1, n))


def test_windows_reject_bad_sizes():
    with pytest.raises(ValueError, match="window"):
        list(windows(10, 1))
    with pytest.raises(ValueError, match="stride"):
        list(windows(10, 4, 5))


def test_builtin_text_is_deterministic_english():
    text = builtin_text()
    assert len(text) > 100_000 and text == builtin_text()
    assert builtin_text(500) == text[:500]
    assert " the " in text[:5000]


@pytest.mark.parametrize("stride", [WINDOW, 48])
def test_perplexity_matches_hf_on_the_same_windows(checkpoints, engine, ids, stride):
    _, model = checkpoints("llama")
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in windows(len(ids), WINDOW, stride):
            logp = model(torch.tensor([ids[start:end]])).logits[0].float().log_softmax(-1)
            rows = torch.arange(first - 1 - start, end - 1 - start)
            nll -= logp[rows, torch.tensor(ids[first:end])].double().sum().item()
            count += len(rows)
    expected = math.exp(nll / count)
    result = evaluate(engine, ids, WINDOW, stride)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert perplexity(engine, ids, WINDOW, stride) == pytest.approx(result.perplexity, rel=1e-12)
    lp = token_logprobs(engine, ids, WINDOW, stride)
    assert lp.shape == (count,) and lp.dtype == torch.float32
    assert math.exp(-lp.double().mean().item()) == pytest.approx(expected, rel=1e-4)


def test_engine_against_itself_has_zero_kl_and_full_agreement(engine, ids):
    result = evaluate(engine, ids, WINDOW, reference=engine)
    assert abs(result.kl) < 1e-6 and result.agreement == 1.0


def test_bf16_build_diverges_a_little(engines, engine, ids):
    bf16 = Engine.load(engines("llama", "bfloat16"), kv_cache_memory=1 << 20)
    result = evaluate(bf16, ids, WINDOW, reference=engine)
    assert 0 < result.kl < 1e-3, result  # ~3e-6 nats on the tiny model
    assert 0.8 < result.agreement <= 1.0, result
    # The same positions as the plain perplexity run.
    assert result.tokens == evaluate(engine, ids, WINDOW).tokens


def test_library_errors(engine, ids):
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(engine, ids[:1], WINDOW)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate(engine, ids, engine.max_seq_len + 1)
    with pytest.raises(ValueError, match=r"\[0, 320\)"):
        evaluate(engine, [1, 2, 320], WINDOW)
    with pytest.raises(ValueError, match="vocab mismatch"):
        evaluate(engine, ids, WINDOW, reference=SimpleNamespace(vocab_size=321))


# ---- CLI ----------------------------------------------------------------------------------

def test_cli_json_matches_the_library(engine_dir, engine, ids, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(builtin_text(900))
    result = _eval(engine_dir, "--text", text, "--window", WINDOW, "--json", *KV)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {"perplexity", "tokens", "window"} <= set(out) and "kl" not in out
    assert out["window"] == WINDOW and out["tokens"] == evaluate(engine, ids, WINDOW).tokens
    assert out["perplexity"] == pytest.approx(perplexity(engine, ids, WINDOW), rel=1e-9)


def test_cli_reference_and_builtin_text(engine_dir):
    result = _eval(engine_dir, "--max-tokens", 200, "--window", 64, "--reference", engine_dir,
                   "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokens"] == 200 - math.ceil(200 / 64)
    assert abs(out["kl"]) < 1e-6 and out["agreement"] == 1.0
    plain = _eval(engine_dir, "--text", "builtin", "--max-tokens", 200, "--window", 64)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("perplexity ")
    assert f"over {out['tokens']} tokens, window 64" in plain.stdout


def test_cli_skip_tokens_scores_the_text_further_in(engine_dir, engine, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(builtin_text(3000))
    ids = engine.tokenizer.encode(text.read_text(), add_special_tokens=False)
    result = _eval(engine_dir, "--text", text, "--skip-tokens", 100, "--max-tokens", 150,
                   "--window", WINDOW, "--json", *KV)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["perplexity"] == pytest.approx(
        perplexity(engine, ids[100:250], WINDOW), rel=1e-9)
    one_line_error(_eval(engine_dir, "--text", text, "--skip-tokens", len(ids), *KV),
                   "--skip-tokens")
    one_line_error(_eval(engine_dir, "--skip-tokens", -1, *KV), "--skip-tokens")


def test_cli_short_text_is_one_window(engine_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.")
    result = _eval(engine_dir, "--text", text, "--json", *KV)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["window"] == out["tokens"] + 1  # the window shrinks to the text


def test_cli_errors(engine_dir, tmp_path):
    missing = tmp_path / "missing.txt"
    one_line_error(_eval(engine_dir, "--text", missing), "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    one_line_error(_eval(engine_dir, "--text", empty), "empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    one_line_error(_eval(engine_dir, "--text", binary), "not UTF-8")
    one_line_error(_eval(engine_dir, "--text", tmp_path), "directory")
    one = tmp_path / "one.txt"
    one.write_text("a")
    one_line_error(_eval(engine_dir, "--text", one, *KV), "1 token(s)")
    one_line_error(_eval(engine_dir, "--window", 1), "--window")
    one_line_error(_eval(engine_dir, "--max-tokens", 1), "--max-tokens")
    one_line_error(_eval(engine_dir, "--window", 600, *KV), "max_seq_len")
    one_line_error(_eval(tmp_path / "nope", *KV))


def test_cli_engine_without_tokenizer_or_other_vocab(engine_dir, tmp_path):
    no_tok = _edited_copy(engine_dir, tmp_path / "no-tok", lambda m: m.pop("tokenizer"))
    one_line_error(_eval(no_tok, "--max-tokens", 50, *KV), "no tokenizer")
    other = _edited_copy(engine_dir, tmp_path / "other-vocab",
                         lambda m: m["generation"].update(vocab_size=321))
    one_line_error(_eval(engine_dir, "--max-tokens", 50, "--reference", other, *KV),
                    "vocab mismatch")
