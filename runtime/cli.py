"""`engine run`, `engine eval` and `engine serve`: the runtime's commands on an engine directory.

`run` generates in the terminal (prompts, a prompts file, or an interactive chat), `eval` scores
a text's perplexity and `serve` starts the HTTP server. The engine-loading options they share
with `engine bench` are in runtime.cli_options. Registered onto the `engine` command group by
builder.cli; imports nothing from the builder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from llm_engine.runtime.cli_options import (
    _fail,
    engine_options,
    load_engine,
    read_json_schema,
    speculative_options,
    speculative_result,
)
from llm_engine.runtime.cluster import RankFailedError
from llm_engine.runtime.rank_files import engine_ranks


def _read_prompts_file(path: Path) -> list[Any]:
    """One prompt per line, or JSONL with {"prompt": ...} or {"messages": [...]} per line."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        _fail(f"cannot read --prompts-file {path}: {e.strerror}")
    prompts = []
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError as e:
                _fail(f"{path}:{i}: invalid JSON ({e})")
            if "messages" in obj:
                prompts.append(obj["messages"])
            elif "prompt" in obj:
                prompts.append(obj["prompt"])
            else:
                _fail(f'{path}:{i}: a JSON line needs "prompt" or "messages"')
        else:
            prompts.append(line)
    if not prompts:
        _fail(f"{path} has no prompts")
    return prompts


def _render(engine, prompt: Any, chat: bool, system: str | None) -> Any:
    if isinstance(prompt, list):  # chat messages from a JSONL file
        return engine.apply_chat_template(prompt, add_generation_prompt=True)
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return engine.apply_chat_template(messages, add_generation_prompt=True)
    return prompt


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", "prompts", multiple=True, help="Prompt text; repeatable.")
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None,
              help="Prompts, one per line or JSONL ({\"prompt\"} / {\"messages\"}); all run "
                   "through the batcher and tokens/s is reported.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True,
              help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per prompt (text, token_ids, finish_reason).")
@click.option("--json-schema", type=click.Path(path_type=Path), default=None,
              help="A JSON Schema file: every output is JSON valid against it (structured "
                   "outputs; see docs/structured.md).")
@engine_options
@speculative_options
def run(engine_dir, prompts, prompts_file, chat, system, max_tokens, temperature, top_p, top_k,
        seed, as_json, json_schema, **engine_kw) -> None:
    """Generate text from ENGINE_DIR (interactive chat when no prompt is given on a TTY)."""
    from llm_engine.runtime.sampling_params import SamplingParams

    structured = read_json_schema(json_schema) if json_schema is not None else None
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, structured=structured)
    except ValueError as e:
        _fail(str(e))
    todo: list[Any] = list(prompts)
    if prompts_file is not None:
        todo += _read_prompts_file(prompts_file)
    if not todo and not sys.stdin.isatty():
        _fail("no prompt: pass --prompt TEXT or --prompts-file F (or run on a terminal to chat)")
    engine = load_engine(engine_dir, **engine_kw, quiet=as_json)
    if not todo:
        _interactive(engine, params, system)
        return
    try:
        rendered = [_render(engine, p, chat, system) for p in todo]
    except ValueError as e:
        _fail(str(e))
    if len(rendered) == 1 and not as_json and prompts_file is None:
        _stream_one(engine, rendered[0], params)
        return
    start = time.perf_counter()
    try:
        outputs = engine.generate(rendered, params, progress=not as_json)
    except (ValueError, RankFailedError) as e:
        _fail(str(e))
    elapsed = time.perf_counter() - start
    for out in outputs:
        if as_json:
            click.echo(json.dumps({"text": out.text, "token_ids": out.token_ids,
                                   "finish_reason": out.finish_reason,
                                   "prompt_tokens": len(out.prompt_token_ids),
                                   **({"error": out.error} if out.error else {})}))
        else:
            click.echo(f"{out.text}\n[{out.finish_reason}]\n")
    generated = sum(len(o.token_ids) for o in outputs)
    click.echo(f"{len(outputs)} prompts, {generated} tokens in {elapsed:.1f}s = "
               f"{generated / elapsed:.1f} tok/s", err=True)
    spec = speculative_result(engine)
    if spec is not None:
        click.echo(spec, err=True)


def _stream_one(engine, prompt: Any, params) -> str:
    text, reason = "", None
    try:
        for out in engine.stream(prompt, params):
            click.echo(out.delta_text, nl=False)
            sys.stdout.flush()
            text += out.delta_text
            reason = out.finish_reason
            if out.error:
                click.echo(f"\nerror: {out.error}", err=True)
    except (ValueError, RankFailedError) as e:
        _fail(str(e))
    click.echo("")
    if reason == "length":
        click.echo("[stopped at --max-tokens]", err=True)
    return text


def _interactive(engine, params, system: str | None) -> None:
    click.echo("chat with the model; empty line or Ctrl-D quits", err=True)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("")
            return
        if not line.strip():
            return
        messages.append({"role": "user", "content": line})
        reply = _stream_one(engine, engine.apply_chat_template(messages), params)
        messages.append({"role": "assistant", "content": reply})


def _read_eval_text(text: str) -> str:
    """--text FILE, or 'builtin' for the standard library's English prose (no network)."""
    if text == "builtin":
        from llm_engine.runtime.evaluate import builtin_text

        return builtin_text()
    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"--text {path}: no such file")
    except IsADirectoryError:
        _fail(f"--text {path} is a directory")
    except UnicodeDecodeError as e:
        _fail(f"--text {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        _fail(f"cannot read --text {path}: {e.strerror}")
    if not content.strip():
        _fail(f"--text {path} is empty")
    return content


@click.command(name="eval")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--text", default="builtin", show_default=True,
              help="UTF-8 text file to score, or 'builtin' (English prose from the Python "
                   "standard library's pydoc topics; the same on every machine).")
@click.option("--window", type=int, default=256, show_default=True,
              help="Tokens per window; windows do not overlap and each starts fresh.")
@click.option("--max-tokens", type=int, default=None,
              help="Score only the first N tokens of the text (default: all of a file, the "
                   "first 8192 of the builtin text).")
@click.option("--skip-tokens", type=int, default=0, show_default=True,
              help="Start N tokens into the text, e.g. past what a quantized build "
                   "calibrated on (the first --calib-samples x --calib-seq-len tokens of "
                   "the builtin text).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Engine dir to compare against: mean KL(ref || eval) and greedy agreement.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (perplexity, tokens, window, ... kl, agreement).")
@engine_options
def eval_(engine_dir, text, window, max_tokens, skip_tokens, reference, as_json,
          **engine_kw) -> None:
    """Perplexity of ENGINE_DIR on a text (and its divergence from --reference)."""
    from llm_engine.runtime.evaluate import evaluate

    if window < 2:
        _fail(f"--window must be >= 2, got {window}")
    if max_tokens is not None and max_tokens < 2:
        _fail(f"--max-tokens must be >= 2, got {max_tokens}")
    if skip_tokens < 0:
        _fail(f"--skip-tokens must be >= 0, got {skip_tokens}")
    for path in (engine_dir, reference):
        # evaluate() runs the plan in its own cache on this process: one rank only.
        if path is not None and engine_ranks(path) > 1:
            _fail(f"{path} is a multi-rank engine; engine eval runs single-rank engines only")
    content = _read_eval_text(text)
    if engine_kw["kv_cache_memory"] is None:
        # eval runs its windows in a private cache; the engine's own one only has to exist.
        engine_kw["kv_cache_memory"] = "64MiB"
    engine = load_engine(engine_dir, **engine_kw, quiet=True)
    ref = load_engine(reference, **engine_kw, quiet=True) if reference is not None else None
    if engine.tokenizer is None:
        _fail(f"{engine_dir} has no tokenizer; eval needs one to tokenize the text")
    ids = engine.tokenizer.encode(content, add_special_tokens=False)
    if skip_tokens and skip_tokens >= len(ids) - 1:
        _fail(f"--skip-tokens {skip_tokens} leaves nothing to score: the text is {len(ids)} "
              "tokens")
    ids = ids[skip_tokens:]
    if max_tokens is None and text == "builtin":
        max_tokens = 8192  # the whole builtin text is ~100k tokens: minutes on a CPU
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        _fail(f"the text is {len(ids)} token(s); perplexity needs at least 2")
    window = min(window, len(ids))  # a short text is one window; report what was used
    try:
        result = evaluate(engine, ids, window, reference=ref)
    except ValueError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(result.summary())


def _read_api_keys(keys: tuple[str, ...], key_file: Path | None) -> tuple[str, ...]:
    """--api-key values plus one key per non-empty line of --api-key-file."""
    out = [k for k in keys if k]
    if key_file is not None:
        try:
            out += [ln.strip() for ln in key_file.read_text().splitlines() if ln.strip()]
        except OSError as e:
            _fail(f"cannot read --api-key-file {key_file}: {e.strerror}")
        if not out:
            _fail(f"--api-key-file {key_file} holds no key")
    return tuple(out)


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", default=None,
              help="Model name in /v1/models and responses (default: the engine dir's name).")
@click.option("--api-key", "api_keys", multiple=True,
              help="Require `Authorization: Bearer KEY` on every route but /health; repeatable.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File with one API key per line (keeps keys out of the process list).")
@click.option("--max-n", type=int, default=8, show_default=True,
              help="Largest `n` (choices per request) accepted.")
@click.option("--max-logprobs", type=int, default=20, show_default=True,
              help="Largest `logprobs` / `top_logprobs` accepted.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin; repeatable (default: no CORS).")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM before they are "
                   "aborted.")
@click.option("--max-concurrent-requests", type=int, default=None,
              help="Requests admitted at once; more get 429 with Retry-After (default: no "
                   "limit).")
@click.option("--request-timeout", type=float, default=None,
              help="Seconds a request may run before it ends with a timeout error (default: "
                   "none).")
@click.option("--body-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client has to send its request body (408 after that; the "
                   "request holds a concurrency slot meanwhile).")
@click.option("--template-timeout", type=float, default=2.0, show_default=True,
              help="Seconds a chat-template render may take (it runs off the engine thread; "
                   "past this the request gets 400).")
@click.option("--tool-call-parser", type=click.Choice(["hermes", "llama3", "mistral"]),
              default=None,
              help="The format the model writes tool calls in (default: detected from the "
                   "chat template's markers; requests with tools get 400 when none is found).")
@engine_options
@speculative_options
def serve(engine_dir, host, port, served_model_name, api_keys, api_key_file, max_n,
          max_logprobs, max_body_bytes, cors_origins, shutdown_timeout, max_concurrent_requests,
          request_timeout, body_timeout, template_timeout, tool_call_parser,
          **engine_kw) -> None:
    """Serve ENGINE_DIR over an OpenAI-compatible HTTP API."""
    from llm_engine.runtime.async_engine import AsyncEngine
    from llm_engine.runtime.server import ServerConfig
    from llm_engine.runtime.server import serve as run_server

    for name, value in (("--max-n", max_n), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            _fail(f"{name} must be >= 1, got {value}")
    if not 0 <= max_logprobs <= 20:
        _fail(f"--max-logprobs must be in [0, 20], got {max_logprobs}")
    if shutdown_timeout < 0:
        _fail(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        _fail(f"--max-concurrent-requests must be >= 1, got {max_concurrent_requests}")
    if request_timeout is not None and request_timeout <= 0:
        _fail(f"--request-timeout must be > 0, got {request_timeout}")
    for name, value in (("--body-timeout", body_timeout),
                        ("--template-timeout", template_timeout)):
        if value <= 0:
            _fail(f"{name} must be > 0, got {value}")
    keys = _read_api_keys(api_keys, api_key_file)
    engine = load_engine(engine_dir, **engine_kw)
    config = ServerConfig(model_name=served_model_name or Path(engine_dir).resolve().name,
                          api_keys=keys, max_n=max_n, max_logprobs=max_logprobs,
                          max_body_bytes=max_body_bytes, cors_origins=tuple(cors_origins),
                          shutdown_timeout=shutdown_timeout,
                          max_concurrent_requests=max_concurrent_requests,
                          request_timeout=request_timeout, body_timeout=body_timeout,
                          template_timeout=template_timeout, tool_call_parser=tool_call_parser)
    click.echo(f"serving {config.model_name} on http://{host}:{port}"
               f"{' (API key required)' if keys else ''}", err=True)
    run_server(AsyncEngine(engine, owns_engine=True), config, host, port)


COMMANDS = [run, eval_, serve]
