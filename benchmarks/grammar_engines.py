#!/usr/bin/env python
"""Grammar engines for structured outputs, measured on SmolLM2's tokenizer (vocabulary 49152):
llguidance, xgrammar and outlines-core, whichever import here.

Over the JSON schemas of tests/structured_schemas.py, per engine:

* compile: ms from a schema to a ready matcher (the library's compile plus the matcher), first
  time and again for the same schema from the compiled object the runtime would cache;
* mask: µs per token to compute the token bitmask while walking the schema's valid instance
  token by token (compute the mask, check the instance's token is allowed, advance); the first
  mask of a matcher is timed apart, since lazily built engines pay for it there;
* coverage: whether the schema compiles, whether the valid instance goes through (every token
  allowed, then EOS allowed), and whether the invalid instance, which breaks one constraint
  (maximum, enum, pattern, ...), is rejected.

Writes benchmarks/results/grammar_engines.json and prints markdown tables.

    python -P benchmarks/grammar_engines.py [--tokenizer engines/smollm2/tokenizer]
        [--engines llguidance,xgrammar,outlines-core] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
import common

DEFAULT_OUT = common.RESULTS / "grammar_engines.json"
EOS = "<|im_end|>"


def _load_cases() -> list[Any]:
    # By file path: the repository root must not go on sys.path (see common.py).
    path = common.REPO / "tests" / "structured_schemas.py"
    spec = importlib.util.spec_from_file_location("structured_schemas", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module.CASES, module.dump


def _default_tokenizer() -> Path:
    return common.REPO / "engines" / "smollm2" / "tokenizer" / "tokenizer.json"


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-to-unicode table, inverted: outlines-core's Vocabulary wants token bytes,
    # and a ByteLevel tokenizer.json stores tokens as these printable stand-ins.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# ---------------------------------------------------------------------------------- engines
# Each adapter: tokenizer(json_str, vocab, eos) -> state; compile(schema) -> compiled;
# matcher(compiled) -> matcher; fill(matcher, mask_int32) ; advance(matcher, token) -> bool.


class Llguidance:
    name = "llguidance"

    def __init__(self, tok_json: str, vocab_size: int, eos: int) -> None:
        import llguidance as llg

        self.llg = llg
        self.version = llg.__version__
        self.tok = llg.LLTokenizer(tok_json, n_vocab=vocab_size, eos_token=eos)

    def compile(self, schema: dict) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        err = self.llg.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m  # a pristine matcher: the runtime caches it and deep-copies per request

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, mask: torch.Tensor) -> None:
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def advance(self, m: Any, token: int) -> bool:
        return m.consume_token(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok_json: str, vocab_size: int, eos: int) -> None:
        from importlib.metadata import version

        import xgrammar as xgr

        self.xgr = xgr
        self.version = version("xgrammar")
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok_json)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(tok_json).get_vocab(with_added_tokens=True)
        encoded = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            encoded[i] = piece
        self.info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=[eos],
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(schema)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, mask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(mask.view(1, -1))

    def advance(self, m: Any, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok_json: str, vocab_size: int, eos: int) -> None:
        import json
        from importlib.metadata import version

        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.build_regex = oc, build_regex_from_schema
        self.version = version("outlines-core")
        model = json.loads(tok_json)
        special = {t["id"] for t in model.get("added_tokens", []) if t.get("special")}
        dec = _byte_decoder()
        pieces: dict[bytes, list[int]] = {}
        for piece, i in model["model"]["vocab"].items():
            if i in special:
                continue
            pieces.setdefault(bytes(dec[c] for c in piece), []).append(i)
        self.vocab = oc.Vocabulary(eos, pieces)

    def compile(self, schema: dict) -> Any:
        import json

        return self.oc.Index(self.build_regex(json.dumps(schema)), self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, mask: torch.Tensor) -> None:
        m.write_mask_into(mask.data_ptr(), mask.numel(), 4)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token)
            return True
        except ValueError:
            return False


ENGINES: dict[str, Callable[..., Any]] = {
    "llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore,
}


# ---------------------------------------------------------------------------------- measuring


def _allowed(mask: torch.Tensor, token: int) -> bool:
    word = int(mask[token // 32]) & 0xFFFFFFFF
    return bool((word >> (token % 32)) & 1)


def walk(engine: Any, compiled: Any, tokens: list[int], eos: int, mask: torch.Tensor,
         timed: list[float] | None = None) -> tuple[bool, float]:
    """Runs `tokens` through a fresh matcher; returns (every token and then EOS allowed,
    first-mask µs). Later masks' µs go to `timed`."""
    m = engine.matcher(compiled)
    first_us = 0.0
    for step, t in enumerate([*tokens, eos]):
        mask.fill_(0)
        t0 = time.perf_counter()
        engine.fill(m, mask)
        us = (time.perf_counter() - t0) * 1e6
        if step == 0:
            first_us = us
        elif timed is not None:
            timed.append(us)
        if not _allowed(mask, t):
            return False, first_us
        if t != eos and not engine.advance(m, t):
            return False, first_us
    return True, first_us


def measure(engine: Any, cases: list[Any], dump: Callable[[Any], str], encode, eos: int,
            vocab_size: int, reps: int) -> list[dict[str, Any]]:
    mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    rows = []
    for case in cases:
        row: dict[str, Any] = {"schema": case.name, "constraint": case.constraint}
        t0 = time.perf_counter()
        try:
            compiled = engine.compile(case.schema)
        except Exception as e:  # any library error is a coverage result, not a crash
            row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            continue
        row["compile_first_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        engine.matcher(engine.compile(case.schema))
        row["compile_again_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        engine.matcher(compiled)
        row["matcher_from_cache_ms"] = (time.perf_counter() - t0) * 1e3
        tokens = encode(dump(case.valid))
        per_token: list[float] = []
        firsts = []
        ok = True
        for _ in range(reps):
            ok_rep, first = walk(engine, compiled, tokens, eos, mask, per_token)
            ok = ok and ok_rep
            firsts.append(first)
        row.update(compiles=True, valid_accepted=ok, tokens=len(tokens),
                   first_mask_us=firsts[0], first_mask_again_us=min(firsts[1:] or firsts),
                   mask_us_median=statistics.median(per_token) if per_token else None,
                   mask_us_p90=float(np.percentile(per_token, 90)) if per_token else None)
        if case.invalid is not None:
            accepted, _ = walk(engine, compiled, encode(dump(case.invalid)), eos, mask)
            row["invalid_rejected"] = not accepted
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["compiles"]]
    checks = [r for r in ok if "invalid_rejected" in r]

    def med(key: str) -> float | None:
        vals = [r[key] for r in ok if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {
        "schemas": len(rows), "compiled": len(ok),
        "valid_accepted": sum(r["valid_accepted"] for r in ok),
        "constraints_checked": len(checks) + sum(1 for r in rows if not r["compiles"]),
        "constraints_enforced": sum(r["invalid_rejected"] for r in checks),
        "not_enforced": [r["schema"] for r in checks if not r["invalid_rejected"]],
        "not_compiled": [r["schema"] for r in rows if not r["compiles"]],
        "compile_first_ms_median": med("compile_first_ms"),
        "compile_first_ms_max": max((r["compile_first_ms"] for r in ok), default=None),
        "compile_again_ms_median": med("compile_again_ms"),
        "matcher_from_cache_ms_median": med("matcher_from_cache_ms"),
        "first_mask_us_median": med("first_mask_us"),
        "mask_us_median": med("mask_us_median"),
        "mask_us_p90_median": med("mask_us_p90"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, default=_default_tokenizer(),
                   help="tokenizer.json, or the folder holding it")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--reps", type=int, default=3, help="walks of each valid instance")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    path = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
    tok_json = path.read_text(encoding="utf-8")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok_json)
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    eos = backend.token_to_id(EOS)

    def encode(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    cases, dump = _load_cases()
    # Mask walks are single-threaded; a step's masks for a batch can be spread over threads
    # by the runtime, which is outside what this compares.
    torch.set_num_threads(1)
    payload: dict[str, Any] = {"machine": common.machine_info(1), "tokenizer": str(path),
                               "vocab_size": vocab_size, "engines": {}}
    for name in args.engines.split(","):
        try:
            t0 = time.perf_counter()
            __import__({"outlines-core": "outlines_core"}.get(name, name))
            import_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            engine = ENGINES[name](tok_json, vocab_size, eos)
            setup_ms = (time.perf_counter() - t0) * 1e3
        except ImportError as e:
            payload["engines"][name] = {"installed": False, "error": str(e)}
            print(f"{name}: not installed ({e})", file=sys.stderr)
            continue
        print(f"{name} {engine.version}: tokenizer info {setup_ms:.0f} ms", file=sys.stderr)
        rows = measure(engine, cases, dump, encode, eos, vocab_size, args.reps)
        payload["engines"][name] = {"installed": True, "version": engine.version,
                                    "import_ms": import_ms,
                                    "tokenizer_setup_ms": setup_ms, "summary": summarize(rows),
                                    "schemas": rows}
    common.write_json(args.out, payload)
    print(report(payload))


def report(payload: dict[str, Any]) -> str:
    fmt = common.fmt
    engines = {k: v for k, v in payload["engines"].items() if v.get("installed")}
    head = ["engine", "version", "import ms", "tokenizer setup ms", "compiled", "valid accepted",
            "constraints enforced", "compile ms (median / max)", "again ms", "matcher from cache ms",
            "first mask µs", "mask µs/token (median / p90)"]
    rows = []
    for name, e in engines.items():
        s = e["summary"]
        rows.append([name, e["version"], fmt(e["import_ms"], 0), fmt(e["tokenizer_setup_ms"], 0),
                     f"{s['compiled']}/{s['schemas']}", f"{s['valid_accepted']}/{s['compiled']}",
                     f"{s['constraints_enforced']}/{s['constraints_checked']}",
                     f"{fmt(s['compile_first_ms_median'], 2)} / {fmt(s['compile_first_ms_max'], 1)}",
                     fmt(s["compile_again_ms_median"], 2), fmt(s["matcher_from_cache_ms_median"], 3),
                     fmt(s["first_mask_us_median"]),
                     f"{fmt(s['mask_us_median'])} / {fmt(s['mask_us_p90_median'])}"])
    out = [common.cpu_line(payload["machine"]), "", common.markdown_table(head, rows), ""]
    # Per schema: compile ms, mask µs, and whether the broken constraint was rejected.
    names = [r["schema"] for r in next(iter(engines.values()))["schemas"]] if engines else []
    head2 = ["schema", "constraint"] + [f"{n}: compile ms / mask µs / rejects" for n in engines]
    rows2 = []
    for i, schema in enumerate(names):
        cells = [schema, engines[next(iter(engines))]["schemas"][i]["constraint"] or "-"]
        for e in engines.values():
            r = e["schemas"][i]
            if not r["compiles"]:
                cells.append("does not compile")
                continue
            rej = {True: "yes", False: "NO", None: "-"}[r.get("invalid_rejected")]
            if not r["valid_accepted"]:
                rej += " (valid REJECTED)"
            cells.append(f"{fmt(r['compile_first_ms'], 2)} / {fmt(r['mask_us_median'])} / {rej}")
        rows2.append(cells)
    out.append(common.markdown_table(head2, rows2))
    return "\n".join(out)


if __name__ == "__main__":
    main()
