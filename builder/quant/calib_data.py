"""Calibration and held-out token windows: from a user's file, or from text every Python has.

`--calib-data FILE` is plain text, or JSONL (`.jsonl`) whose lines are objects with a
`"text"` string or an `"input_ids"` list. Without a file the source is the English help text
that ships with Python (`runtime.evaluate.builtin_text`), so a build never downloads anything.
Calibration windows are taken from the start of the token stream and the held-out windows
(used to measure perplexity after quantization) from its end, so the two never overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm_engine.builder.errors import BuildError

MIN_WINDOW = 16


@dataclass
class CalibData:
    source: str
    samples: list[list[int]]
    heldout: list[list[int]]
    seq_len: int
    notes: list[str]


def _read(path: Path) -> tuple[list[str], list[list[int]]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"--calib-data {path}: cannot read it ({e.__class__.__name__}: {e}); "
                         "pass a UTF-8 text or JSONL file") from e
    if not raw.strip():
        raise BuildError(f"--calib-data {path} is empty; pass a file with text to calibrate on")
    if path.suffix.lower() != ".jsonl":
        return [raw], []
    texts, ids = [], []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise BuildError(f"--calib-data {path}:{n}: not valid JSON ({e})") from e
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), list) and \
                all(isinstance(i, int) for i in obj["input_ids"]):
            ids.append(obj["input_ids"])
        else:
            raise BuildError(f"--calib-data {path}:{n}: each JSONL line needs a \"text\" string "
                             "or an \"input_ids\" list of ints")
    return texts, ids


def load_calib_data(path: Path | None, tokenizer, *, samples: int, seq_len: int,
                    heldout: int, vocab_size: int) -> CalibData:
    """`samples` calibration windows and `heldout` evaluation windows of `seq_len` tokens."""
    notes: list[str] = []
    if path is None:
        from llm_engine.runtime.evaluate import builtin_text

        texts, id_lists, source = [builtin_text()], [], "builtin (Python's pydoc topic texts)"
    else:
        texts, id_lists = _read(Path(path))
        source = str(path)
    stream: list[int] = []
    if texts:
        if tokenizer is None:
            raise BuildError("calibration text needs the model's tokenizer, and this checkpoint "
                             "has none; pass --calib-data FILE.jsonl with \"input_ids\" lines")
        for text in texts:
            stream += tokenizer.encode(text, add_special_tokens=False)
    for ids in id_lists:
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise BuildError(f"--calib-data {path}: token id {bad[0]} is outside the "
                             f"vocabulary (0..{vocab_size - 1})")
        stream += ids
    want = samples + heldout
    if len(stream) < want * seq_len:
        fit = len(stream) // want
        if fit < MIN_WINDOW:
            raise BuildError(f"calibration data gives {len(stream)} tokens, too few for "
                             f"{samples} + {heldout} windows of at least {MIN_WINDOW}; pass a "
                             "longer --calib-data or fewer --calib-samples")
        notes.append(f"calibration text has {len(stream)} tokens: windows shortened from "
                     f"{seq_len} to {fit}")
        seq_len = fit
    windows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(samples)]
    tail = len(stream) - heldout * seq_len
    held = [stream[tail + i * seq_len:tail + (i + 1) * seq_len] for i in range(heldout)]
    return CalibData(source, windows, held, seq_len, notes)
