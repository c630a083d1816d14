"""`engine run` on the tiny llama engine (it has a tokenizer): a streamed prompt, --json, a
prompts file (plain lines and JSONL), --chat, and bad input as one line `error: ...`, exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main
from llm_engine.runtime import Engine, SamplingParams
from llm_engine.runtime.cpu_info import cpu_info
from tests.cli_util import one_line_error

KV = ["--kv-cache-memory", "4MiB"]  # the default would reserve up to 2 GiB


@pytest.fixture(scope="module")
def engine_dir(engines):
    return engines("llama")


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.load(engine_dir, kv_cache_memory=4 << 20)


def _run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["run", *map(str, args)], input=input)


def _greedy(engine: Engine, prompts, max_tokens: int = 5):
    return engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))



def test_single_prompt_streams_the_greedy_text(engine_dir, engine):
    result = _run(engine_dir, "--prompt", "Hello, world!", "--max-tokens", "5",
                  "--temperature", "0", *KV)
    assert result.exit_code == 0, result.output
    (ref,) = _greedy(engine, ["Hello, world!"])
    assert result.stdout == ref.text + "\n"
    assert "KV cache:" in result.stderr and "[stopped at --max-tokens]" in result.stderr
    # what the backend chose on this machine, from the machine (never from the engine)
    cpu = cpu_info()
    assert f"backend: {engine.kernel_backend} (" in result.stderr
    assert f"{cpu.physical_cores} cores, {cpu.isa})" in result.stderr


def test_json_prints_one_object_per_prompt(engine_dir, engine):
    prompts = ["Hello, world!", "Paris is"]
    result = _run(engine_dir, "--prompt", prompts[0], "-p", prompts[1], "--max-tokens", "5",
                  "--temperature", "0", "--json", *KV)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, ref in zip(lines, _greedy(engine, prompts)):
        obj = json.loads(line)
        assert obj["text"] == ref.text and obj["token_ids"] == ref.token_ids
        assert obj["finish_reason"] == "length" and len(obj["token_ids"]) == 5
        assert obj["prompt_tokens"] == len(ref.prompt_token_ids)
    assert "tok/s" in result.stderr


def test_prompts_file_plain_and_jsonl(engine_dir, engine, tmp_path):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = tmp_path / "prompts.txt"
    plain.write_text("Hello, world!\n\nParis is\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Paris is"}) + "\n"
                     + json.dumps({"messages": messages}) + "\n")
    chat_text = engine.apply_chat_template(messages, add_generation_prompt=True)
    for path, prompts in ((plain, ["Hello, world!", "Paris is"]),
                          (jsonl, ["Paris is", chat_text])):
        result = _run(engine_dir, "--prompts-file", path, "--max-tokens", "5",
                      "--temperature", "0", *KV)
        assert result.exit_code == 0, result.output
        refs = _greedy(engine, prompts)
        assert result.stdout == "".join(f"{r.text}\n[length]\n\n" for r in refs)
        assert f"{len(prompts)} prompts, 10 tokens in" in result.stderr
        assert "tok/s" in result.stderr
    result = _run(engine_dir, "--prompts-file", jsonl, "--json", "--max-tokens", "5",
                  "--temperature", "0", *KV)
    objs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["token_ids"] for o in objs] == [r.token_ids for r in refs]


def test_chat_wraps_the_prompt_in_the_template(engine_dir, engine):
    result = _run(engine_dir, "--chat", "--system", "Be brief.", "--prompt", "Hi there",
                  "--json", "--max-tokens", "5", "--temperature", "0", *KV)
    assert result.exit_code == 0, result.output
    text = engine.apply_chat_template([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi there"}])
    (ref,) = _greedy(engine, [text])
    obj = json.loads(result.stdout)
    assert obj["prompt_tokens"] == len(engine.tokenizer.encode(text))
    assert obj["token_ids"] == ref.token_ids and obj["text"] == ref.text
    # Without --chat the same prompt is sent as is.
    plain = json.loads(_run(engine_dir, "--prompt", "Hi there", "--json", "--max-tokens", "5",
                            "--temperature", "0", *KV).stdout)
    assert plain["prompt_tokens"] == len(engine.tokenizer.encode("Hi there"))


def test_bad_input_is_one_line_and_exit_2(engine_dir, tmp_path):
    ok = ["--prompt", "hi", "--max-tokens", "2", *KV]
    one_line_error(_run(tmp_path / "nope", *ok), "nope", "engine build")
    one_line_error(_run(engine_dir, *ok, "--temperature", "-1"), "temperature")
    one_line_error(_run(engine_dir, "--prompt", "hi", "--kv-cache-memory", "lots"),
                    "'lots'", "512MiB")
    one_line_error(_run(engine_dir, "--prompt", "hi", "--kv-cache-memory", "1"),
                    "--kv-cache-memory")  # 1 byte holds no KV block
    one_line_error(_run(engine_dir, "--prompts-file", tmp_path / "missing.txt", *KV),
                    "--prompts-file", "missing.txt")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "no prompt key"}\n')
    one_line_error(_run(engine_dir, "--prompts-file", bad_jsonl, *KV), "bad.jsonl:1")
    one_line_error(_run(engine_dir, *KV, input="piped text\n"), "no prompt")
    one_line_error(_run(engine_dir, *ok, "--threads", "0"), "--threads must be >= 1")


def test_interactive_chat_on_a_tty(engine_dir, engine):
    """No prompt on a terminal: a chat loop that keeps the conversation and streams replies."""
    import shutil
    import sys

    pexpect = pytest.importorskip("pexpect")
    exe = shutil.which("engine") or f"{sys.executable} -m builder.cli"
    child = pexpect.spawn(f"{exe} run {engine_dir} --temperature 0 --max-tokens 5",
                          encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("hello there")
    child.expect(">>> ")
    messages = [{"role": "user", "content": "hello there"}]
    want = _greedy(engine, [engine.apply_chat_template(messages)])[0].text
    assert want.strip() in child.before
    child.sendline("")
    child.expect(pexpect.EOF)
    assert child.wait() == 0
