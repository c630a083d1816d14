"""Symbolic sizes: the expressions of T and N that shapes and attributes carry in graphs and
engine plans. They come from files, so anything but small integer arithmetic is refused."""

from __future__ import annotations

import pytest

from llm_engine.kernels.symbolic import eval_shape, eval_size, has_sym, resolve

ENV = {"T": 7, "N": 3}


@pytest.mark.parametrize(("expr", "value"), [
    (5, 5),
    ("T", 7),
    ("N", 3),
    ("4*T", 28),
    ("T + 1", 8),
    ("T - N", 4),
    ("2*T*N", 42),
    ("T // 2", 3),
    ("T % 4", 3),
    ("-T", -7),
    ("+T", 7),
    ("-(T - 1)", -6),
    ("3", 3),
])
def test_eval_size(expr: int | str, value: int) -> None:
    assert eval_size(expr, ENV) == value


@pytest.mark.parametrize("expr", [
    "T / 2",  # true division would give a float
    "T ** 2",
    "2.5 * T",  # int() would truncate the constant silently
    "True * T",
    "~T",
    "not T",
    "'T'",
    "f(T)",
    "T.real",
    "__import__('os')",
    "T if N else 1",
])
def test_eval_size_refuses_anything_else(expr: str) -> None:
    with pytest.raises(ValueError, match="unsupported symbolic size expression"):
        eval_size(expr, ENV)


def test_eval_size_refuses_unknown_symbol() -> None:
    with pytest.raises(ValueError, match=r"uses 'B'; only \('T', 'N'\) exist"):
        eval_size("B * T", ENV)


def test_eval_size_refuses_bad_syntax() -> None:
    with pytest.raises(SyntaxError):
        eval_size("T +", ENV)


def test_eval_shape() -> None:
    assert eval_shape((1, "T", "4*T", 8), ENV) == (1, 7, 28, 8)
    assert eval_shape(("N", -1), ENV) == (3, -1)  # -1 (a runtime-only size) passes through
    assert eval_shape((), ENV) == ()


def test_resolve_replaces_every_sym_leaf() -> None:
    attrs = {"shape": [1, {"sym": "T"}, {"sym": "2*T"}], "dim": 1,
             "nested": {"end": {"sym": "N"}, "keep": "T"}}
    assert resolve(attrs, ENV) == {"shape": [1, 7, 14], "dim": 1,
                                   "nested": {"end": 3, "keep": "T"}}
    # a plain string is not symbolic: only {"sym": ...} is
    assert resolve("T", ENV) == "T"
    assert resolve({"sym": "T + 1"}, ENV) == 8


def test_resolve_does_not_touch_a_dict_with_more_than_sym() -> None:
    # {"sym": ..., other keys} is an ordinary attribute dict, resolved key by key
    assert resolve({"sym": "T", "x": {"sym": "N"}}, ENV) == {"sym": "T", "x": 3}


def test_resolve_leaves_input_unchanged() -> None:
    attrs = {"shape": [{"sym": "T"}]}
    resolve(attrs, ENV)
    assert attrs == {"shape": [{"sym": "T"}]}


@pytest.mark.parametrize(("value", "expected"), [
    ({"sym": "T"}, True),
    ([1, {"sym": "T"}], True),
    ({"shape": [1, [2, {"sym": "N"}]]}, True),
    ({"shape": [1, 2], "name": "T"}, False),
    ("T", False),
    (3, False),
    ([], False),
    ({}, False),
])
def test_has_sym(value, expected: bool) -> None:
    assert has_sym(value) is expected
