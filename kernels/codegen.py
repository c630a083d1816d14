"""Render kernel templates and load the rendered modules.

Shared by the builder (which chooses templates and parameters) and the runtime (which
re-renders each kernel of an engine to check the stored source, so an engine directory can
never carry code that the templates did not produce). Imports jinja2 and the stdlib only;
triton is imported by the rendered modules themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import linecache
import os
import re
import stat
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from llm_engine import templates


class TemplateError(ValueError):
    """A template is missing or was given parameters it cannot render."""


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates.DIR)),
        undefined=jinja2.StrictUndefined,  # a missing parameter is an error, not ""
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def template_names() -> list[str]:
    return sorted(p.name.removesuffix(".py.j2") for p in templates.DIR.glob("*.py.j2"))


# Template parameters are rendered into Python source, and an engine directory from elsewhere
# supplies them (the runtime re-renders its kernels from the plan), so only values that cannot
# form code of their own are rendered: numbers, booleans, None, and strings from this list of
# words the kernel families use (dtype names, op and activation names, weight formats, input
# kinds), plus the few code fragments the families themselves choose between.
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A plan node name (weights may join several: q_proj+k_proj+v_proj), and the entry that ends a
# long list in a kernel's header (builder.codegen lists at most MAX_LISTED_NODES).
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+\-]*\Z")
MORE_NODES = re.compile(r"\.\.\. ([1-9][0-9]{0,6}) more\Z")
_FRAGMENTS = frozenset({"", ', input_precision="ieee"'})
# Counts the templates loop over or that size a launch: an engine's value beyond these would
# make rendering (or the kernel) run for ever, not compute anything.
_INT_RANGE = {"rank": (0, 16), "num_warps": (1, 64), "num_stages": (1, 16),
              "head_dim": (1, 1 << 12), "num_heads": (1, 1 << 12), "num_kv_heads": (1, 1 << 12),
              "block_size": (1, 1 << 12)}
_MAX_PARAM_DEPTH = 64  # an expression tree level is two (a node, its args)
_MAX_PARAM_ITEMS = 4096


@lru_cache(maxsize=1)
def allowed_words() -> frozenset[str]:
    from llm_engine.kernels.dtypes import _DTYPES
    from llm_engine.kernels.formats import FORMATS
    from llm_engine.kernels.ops import OPS
    from llm_engine.kernels.triton.gemm import ACTIVATIONS

    # pointwise input layouts, gelu approximations, dot precisions, norm and sampling kinds
    kinds = {"full", "scalar", "inner", "outer", "strided", "none", "tanh", "ieee", "tf32",
             "rms", "layer", "argmax", "softmax_topk"}
    return frozenset({*_DTYPES, *OPS, *FORMATS, *ACTIVATIONS, *kinds})


def check_params(value: Any, where: str = "params", depth: int = 0, budget: list | None = None
                 ) -> None:
    """Raise TemplateError unless `value` holds only what may be rendered into code (above)."""
    budget = [_MAX_PARAM_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_PARAM_DEPTH:
        raise TemplateError(f"{where}: kernel parameters nest too deep or hold too much")
    if value is None or isinstance(value, bool | float):
        return
    if isinstance(value, int):
        key = where.rsplit(".", 1)[-1]
        low, high = _INT_RANGE.get(key, (-(1 << 40), 1 << 40))
        if not low <= value <= high:
            raise TemplateError(f"{where}: {value} is outside [{low}, {high}]")
        return
    if isinstance(value, str):
        if value in _FRAGMENTS or (_WORD.match(value) and value in allowed_words()):
            return
        raise TemplateError(f"{where}: {value[:40]!r} is not a value a kernel template takes")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not _WORD.match(k):
                raise TemplateError(f"{where}: key {str(k)[:40]!r} is not an identifier")
            check_params(v, f"{where}.{k}", depth + 1, budget)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_params(v, f"{where}[{i}]", depth + 1, budget)
        return
    raise TemplateError(f"{where}: a {type(value).__name__} is not a kernel parameter")


def render(template: str, params: dict[str, Any], *, nodes: list[str] | None = None) -> str:
    """Render `templates/<template>.py.j2` with `params`. The source starts with a header
    naming the template, its parameters and the IR nodes it implements. Parameters and node
    names are checked first (`check_params`, `NODE_NAME`): nothing else reaches the source."""
    check_params(params)
    nodes = list(nodes or ())
    for i, node in enumerate(nodes):
        if not isinstance(node, str) or not (
                NODE_NAME.match(node) or (i == len(nodes) - 1 and MORE_NODES.match(node))):
            raise TemplateError(f"node name {str(node)[:40]!r} is not a plan node name")
    try:
        body = environment().get_template(f"{template}.py.j2").render(**params)
    except jinja2.TemplateNotFound:
        raise TemplateError(f"no kernel template {template!r}; have {template_names()}") \
            from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template {template!r}: {e.message}") from e
    header = [f"# Generated by llm-engine from templates/{template}.py.j2 - do not edit.",
              f"# params: {json.dumps(params, sort_keys=True, default=str)}"]
    if nodes:
        header.append(f"# implements: {', '.join(nodes)}")
    return "\n".join(header) + "\n" + body


def kernel_name(source: str) -> str:
    """Kernels are named by the hash of their source: identical kernels share one file."""
    return "k_" + hashlib.sha256(source.encode()).hexdigest()[:16]


KERNEL_NAME = re.compile(r"k_[0-9a-f]{16}\Z")  # what kernel_name returns


class KernelCacheError(OSError):
    """The kernel cache directory is not private to this user."""


def _cache_dir() -> Path:
    """The directory rendered kernels are written to: $LLM_ENGINE_KERNEL_CACHE, else
    `<tmp>/llm-engine-kernels-<uid>`. Another user on the host could pre-create a shared
    name and plant files or links in it, so the directory must be a real directory (not a
    link) owned by this user and writable by nobody else; it is created 0700."""
    root = os.environ.get("LLM_ENGINE_KERNEL_CACHE")
    path = Path(root) if root else \
        Path(tempfile.gettempdir()) / f"llm-engine-kernels-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else \
            f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
        raise KernelCacheError(
            f"kernel cache {path} is {kind}, not a directory only this user (uid "
            f"{os.getuid()}) can write; remove it or set LLM_ENGINE_KERNEL_CACHE to a private "
            "directory")
    return path


def _write_private(path: Path, source: str) -> None:
    """Write `source` to `path` through a new file of a random name (created exclusively,
    never through a link) renamed over it: a planted link at `path` is replaced, not
    followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_kernel(source: str) -> ModuleType:
    """Run rendered (and verified) kernel source as a module.

    The module executes `source` itself, compiled here, never what is on disk or a cached
    bytecode file: the file written under its hash is only for Triton, which reads a kernel's
    source through `inspect`, and for tracebacks, and `linecache` is given the same text so
    that `inspect` never reads the file either."""
    name = kernel_name(source)
    if name in sys.modules:
        return sys.modules[name]
    path = _cache_dir() / f"{name}.py"
    try:
        current = path.read_text() if path.is_file() and not path.is_symlink() else None
    except OSError:
        current = None
    if current != source:
        _write_private(path, source)
    filename = str(path)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = compile(source, filename, "exec", dont_inherit=True)
    module = ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module
