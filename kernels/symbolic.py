"""Symbolic sizes: the token dimension `T` of a flat batch, and small expressions of it.

Shapes in the IR and in plans are lists whose entries are ints or expression strings such as
`"T"` or `"4*T"`; attributes that depend on T hold `{"sym": "T"}`. `N` is the second size a
plan knows: the number of rows whose logits are computed (`logits_indices`). Expressions are parsed
with `ast`, never `eval`: an engine file must not be a way to run code.
"""

from __future__ import annotations

import ast
import operator
from functools import lru_cache

SYMBOLS = ("T", "N")
Env = dict[str, int]

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# Sizes are integers: `~`/`not` and float constants (which `int()` would truncate) are refused.
_UNARYOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@lru_cache(maxsize=4096)
def _parse(expr: str) -> ast.AST:
    tree = ast.parse(expr, mode="eval").body
    for node in ast.walk(tree):
        ok = isinstance(node, ast.BinOp | ast.Constant | ast.Name | ast.UnaryOp | ast.operator
                        | ast.unaryop | ast.Load)
        if not ok or (isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS) \
                or (isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARYOPS) \
                or (isinstance(node, ast.Constant) and type(node.value) is not int):
            raise ValueError(f"unsupported symbolic size expression {expr!r}")
        if isinstance(node, ast.Name) and node.id not in SYMBOLS:
            raise ValueError(f"symbolic size {expr!r} uses {node.id!r}; only {SYMBOLS} exist")
    return tree


def _eval(node: ast.AST, env: Env) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        return _UNARYOPS[type(node.op)](_eval(node.operand, env))
    return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))


def eval_size(size: int | str, env: Env) -> int:
    return size if isinstance(size, int) else _eval(_parse(size), env)


def eval_shape(shape, env: Env) -> tuple[int, ...]:
    return tuple(eval_size(s, env) for s in shape)


def resolve(value, env: Env):
    """Replace every `{"sym": expr}` inside an attribute value by its integer value."""
    if isinstance(value, dict):
        if set(value) == {"sym"}:
            return eval_size(value["sym"], env)
        return {k: resolve(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, env) for v in value]
    return value


def has_sym(value) -> bool:
    if isinstance(value, dict):
        return set(value) == {"sym"} or any(has_sym(v) for v in value.values())
    if isinstance(value, list):
        return any(has_sym(v) for v in value)
    return False
