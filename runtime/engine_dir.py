"""Read and validate an engine directory; memory-map its weights.

Validation happens before anything runs: format and builder versions, that every listed file
exists and matches its sha256, that the plan only names known ops, and that the target device is
here.
Weights are mapped straight from the safetensors file (read-only, shared with the page cache)
rather than copied, so loading costs no weight-sized allocation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

FORMAT_VERSION = 1
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
if hasattr(torch, "float8_e4m3fn"):
    _ST_DTYPES["F8_E4M3"] = torch.float8_e4m3fn


class EngineLoadError(Exception):
    """The engine directory cannot be used; the message says why and what to do."""


@dataclass
class EngineFiles:
    path: Path
    meta: dict[str, Any]
    plan: dict[str, Any]
    weights: dict[str, torch.Tensor]
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """(data start, name -> (dtype, shape, start, end)) of a safetensors file, read from its
    header alone and checked: known dtypes, each tensor's bytes exactly its shape's, the
    tensors tiling the data without gap or overlap, and the file ending where they end. So
    the file is as large as the tensors it declares and no larger: a planted giant is refused
    before anything hashes or maps it."""
    def bad(why: str) -> EngineLoadError:
        return EngineLoadError(f"{path}: not a safetensors file the builder writes ({why}); "
                               "rebuild the engine")

    size = os.lstat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("no header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"a header of {n} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise bad(f"header: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, list[int], int, int]] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name[:80]!r} has no dtype, shape and data_offsets") from None
        if dtype not in _ST_DTYPES or not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
            raise bad(f"tensor {name[:80]!r}: dtype {str(dtype)[:20]!r}, shape {str(shape)[:60]}")
        numel = 1
        for d in shape:
            numel *= d
        if type(start) is not int or type(end) is not int or \
                not 0 <= start <= end or end - start != numel * _ST_DTYPES[dtype].itemsize:
            raise bad(f"tensor {name[:80]!r}: offsets {start}..{end} for shape {shape}")
        tensors[name] = (dtype, shape, start, end)
    at = 0
    for _, _, start, end in sorted(tensors.values(), key=lambda t: (t[2], t[3])):
        if start != at:
            raise bad(f"tensor data {'overlaps' if start < at else 'has a gap'} at {start}")
        at = end
    if 8 + n + at != size:
        raise bad(f"the file is {size} bytes, its tensors end at {8 + n + at}")
    return 8 + n, tensors


def check_weights(path: Path, weights: Any, name: str
                  ) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """The weights file holds exactly the tensors the plan declares, of their shapes and
    dtypes (checked from the header, before the file is hashed or mapped); its layout."""
    layout = safetensors_layout(path)
    tensors = layout[1]
    if not isinstance(weights, dict):
        raise EngineLoadError(f"{name}: 'weights' is not a mapping; rebuild the engine")
    if set(tensors) != set(weights):
        odd = sorted(set(tensors) ^ set(weights))
        raise EngineLoadError(f"{path.name} and {name} disagree on the weight list "
                              f"({', '.join(o[:60] for o in odd[:3])}); rebuild the engine")
    for key, (dtype, shape, _, _) in tensors.items():
        want = weights[key]
        if not isinstance(want, dict) or want.get("shape") != shape or \
                want.get("dtype") != str(_ST_DTYPES[dtype]).removeprefix("torch."):
            raise EngineLoadError(f"{path.name}: {key[:80]} is {dtype} {shape}, not what "
                                  f"{name} declares; rebuild the engine")
    return layout


def map_safetensors(path: Path, layout: tuple[int, dict] | None = None
                    ) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """Zero-copy tensors over a memory map of a safetensors file (its layout checked, or the
    `safetensors_layout` already read)."""
    base, layout = layout or safetensors_layout(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mm)
    tensors = {}
    for name, (st_dtype, shape, start, end) in layout.items():
        dtype = _ST_DTYPES[st_dtype]
        if end == start:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        with _quiet_readonly():
            flat = torch.frombuffer(buf[base + start:base + end], dtype=dtype)
        tensors[name] = flat.view(shape)
    return tensors, mm


class _quiet_readonly:
    """torch warns that a read-only buffer makes a non-writable tensor; weights are
    never written, so the warning is noise."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*not writable.*")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        st = os.lstat(path)  # engine.json is read before the manifest's checks: its own here
        if not stat.S_ISREG(st.st_mode) or st.st_size > _SIZE_LIMITS[".json"]:
            raise EngineLoadError(f"{path} is not a regular file of at most "
                                  f"{_SIZE_LIMITS['.json'] >> 20} MiB; refusing the engine")
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineLoadError(f"{path} is missing; rebuild the engine with `engine build`") \
            from None
    except (OSError, ValueError, RecursionError) as e:
        raise EngineLoadError(f"{path} is not valid JSON ({str(e)[:200]}); rebuild the "
                              "engine") from e


def runtime_version() -> str:
    try:
        return importlib.metadata.version("llm-engine")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0.1.0"


def _major(version: Any) -> int | None:
    try:
        return int(str(version).strip().lstrip("v").split(".")[0])
    except ValueError:
        return None


def check_builder_version(meta: dict[str, Any]) -> None:
    """A newer builder MAJOR may write plans this runtime misreads even at the same format
    version, so such engines are refused. A missing or unparseable version is let through: the
    format_version check already guards the layout."""
    built_by = meta.get("builder_version")
    ours = runtime_version()
    theirs_major, our_major = _major(built_by), _major(ours)
    if theirs_major is not None and our_major is not None and theirs_major > our_major:
        raise EngineLoadError(f"engine was built by llm-engine {built_by}, this runtime is "
                              f"{ours}; upgrade llm-engine")


def check_device(meta: dict[str, Any], device: str) -> None:
    target = meta.get("target", {}).get("device", "cpu")
    if target == "cuda" and not torch.cuda.is_available():
        raise EngineLoadError("engine was built for cuda but no CUDA device is present; "
                              "rebuild it with --device cpu or run it on a GPU host")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineLoadError(f"device {device!r} requested but CUDA is not available")


def engine_path(root: Path, rel: Any, what: str) -> Path:
    """`root / rel` for a path an engine directory names: relative, without `..`, and with no
    symbolic link on the way, so it cannot leave the directory. (Existence is not checked.)"""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise EngineLoadError(f"{what} {str(rel)[:80]!r} is not a relative path; the engine "
                              "directory was modified, rebuild it")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in ("..", ".") for p in parts):
        raise EngineLoadError(f"{what} {rel[:80]!r} leaves the engine directory; refusing it")
    current = root
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise EngineLoadError(f"{what} {rel[:80]!r} goes through a symbolic link; an engine "
                                  "directory holds plain files only, refusing it")
    return root / rel


# Largest size of each kind of file, so that hashing or parsing a planted giant (a sparse file
# costs its owner nothing) ends quickly; far above what the builder writes for any model.
# Weights are as large as the model is: their bound is the plan's weight list, which their
# headers must match (check_weights) before they are hashed.
_SIZE_LIMITS = {".json": 256 << 20, ".py": 8 << 20, ".jinja": 16 << 20, ".onnx": 2 << 30}
_OTHER_LIMIT = 512 << 20  # tokenizer files (tokenizer.json of a 256k vocabulary is ~30 MB)
_WEIGHTS_FILE = re.compile(r"weights\.rank([0-9]{1,4})\.safetensors\Z")


def _size_limit(rel: PurePosixPath) -> int:
    if _WEIGHTS_FILE.match(rel.as_posix()):
        return 1 << 62
    return _SIZE_LIMITS.get(rel.suffix, _OTHER_LIMIT)


def confine_files(root: Path, files: dict[str, Any]) -> None:
    """Every manifest entry is a plain file inside `root`, and `root` holds nothing else: no
    unlisted file (read by a loader that globs), no link, no device or pipe (a read that never
    ends)."""
    listed = set()
    for rel in files:
        f = engine_path(root, rel, "engine.json: files entry")
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            raise EngineLoadError(f"{f} is missing; the engine is incomplete, rebuild it") \
                from None
        if not stat.S_ISREG(st.st_mode):
            raise EngineLoadError(f"{f} is not a regular file; refusing the engine")
        limit = _size_limit(PurePosixPath(rel))
        if st.st_size > limit:
            raise EngineLoadError(f"{f} is {st.st_size} bytes, over the {limit >> 20} MiB a "
                                  "file of its kind can be; refusing the engine")
        listed.add(PurePosixPath(rel).as_posix())
    for dirpath, dirnames, filenames in os.walk(root):  # walk does not follow links
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                continue
            if rel != "engine.json" and rel not in listed:
                raise EngineLoadError(f"{full} is not in engine.json's file list; an engine "
                                      "directory holds only what its builder wrote. Remove it "
                                      "or rebuild the engine")
            if not stat.S_ISREG(st.st_mode):
                raise EngineLoadError(f"{full} is not a regular file; refusing the engine")


_MAX_DIM = 1 << 16  # heads, head sizes: far above any model, far below an absurd allocation


def _count(value: Any, where: str, low: int = 1, high: int = _MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise EngineLoadError(f"{where} is {str(value)[:40]}; expected an integer in "
                              f"[{low}, {high}]. The engine directory was modified, rebuild it")
    return value


def check_plan_sizes(plan: Any, name: str) -> None:
    """The sizes the runtime divides by and allocates with (the KV cache's layers, each
    attention node's heads) are integers in range, so a malformed value is a load error
    naming the field, not a ZeroDivisionError or a huge allocation later."""
    if not isinstance(plan, dict) or not isinstance(plan.get("nodes"), list):
        raise EngineLoadError(f"{name} has no node list; rebuild the engine")
    layers = (plan.get("kv_cache") or {}).get("layers", [])
    if not isinstance(layers, list) or len(layers) > _MAX_DIM:
        raise EngineLoadError(f"{name}: kv_cache.layers is not a list of layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise EngineLoadError(f"{name}: kv_cache.layers[{i}] is not an object")
        for key in ("num_kv_heads", "head_dim"):
            _count(layer.get(key), f"{name}: kv_cache.layers[{i}].{key}")
        if layer.get("window") is not None:
            _count(layer["window"], f"{name}: kv_cache.layers[{i}].window", 1, 1 << 40)
    for node in plan["nodes"]:
        if isinstance(node, dict) and node.get("op") == "paged_attention":
            attrs, where = node.get("attrs") or {}, f"{name}: node {str(node.get('name'))[:40]}"
            # (not num_heads % num_kv_heads: a tensor-parallel rank may hold uneven shares,
            # mapped by kv_head_map)
            for key in ("num_heads", "num_kv_heads", "head_dim"):
                _count(attrs.get(key), f"{where} {key}")


def load_engine_dir(path: str | Path, *, device: str = "cpu", rank: int = 0,
                    verify_checksums: bool = True) -> EngineFiles:
    path = Path(path)
    if not path.is_dir():
        raise EngineLoadError(f"{path} is not an engine directory; build one with `engine build`")
    meta = _read_json(path / "engine.json")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise EngineLoadError(f"{path}/engine.json has no format_version; rebuild the engine")
    if version > FORMAT_VERSION:
        raise EngineLoadError(f"engine format v{version} is newer than this runtime reads "
                              f"(v{FORMAT_VERSION}); upgrade llm-engine")
    check_builder_version(meta)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise EngineLoadError(f"{path}/engine.json lists no files; rebuild the engine")
    confine_files(path, files)
    plans: dict[str, Any] = {}
    layouts: dict[str, tuple[int, dict]] = {}
    # Weights last: they are hashed only once the plan that declares them is read, and their
    # headers agree with it (so their size is what the plan says, not what a file claims).
    for rel, info in sorted(files.items(), key=lambda kv: kv[0].endswith(".safetensors")):
        f = path / rel
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or \
                not isinstance(info.get("sha256"), str):
            raise EngineLoadError(f"engine.json: files[{rel!r}] needs bytes and sha256; "
                                  "rebuild the engine")
        if f.stat().st_size != info["bytes"]:
            raise EngineLoadError(f"{f} does not match its checksum in engine.json (it is "
                                  f"{f.stat().st_size} bytes, not {info['bytes']}); the file is "
                                  "corrupt or was modified, rebuild the engine")
        weights = _WEIGHTS_FILE.match(rel)
        if weights:
            plan_name = f"plan.rank{weights.group(1)}.json"
            if plan_name not in plans:
                plans[plan_name] = _read_json(path / plan_name)
            layouts[rel] = check_weights(f, (plans[plan_name] or {}).get("weights"), plan_name)
        if verify_checksums and sha256_file(f) != info["sha256"]:
            raise EngineLoadError(f"{f} does not match its checksum in engine.json; the file "
                                  "is corrupt or was modified, rebuild the engine")
    check_device(meta, device)
    plan = plans.get(f"plan.rank{rank}.json") or _read_json(path / f"plan.rank{rank}.json")
    check_plan_sizes(plan, f"plan.rank{rank}.json")
    name = f"weights.rank{rank}.safetensors"
    weights, mm = map_safetensors(path / name, layouts.get(name))
    return EngineFiles(path, meta, plan, weights, [mm])
