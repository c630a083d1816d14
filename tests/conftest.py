"""Shared fixtures: tiny random-weight HF checkpoints of every supported architecture, and
engines built from them (cached per session: a build takes a few seconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from tests.models import ARCHS, build_tiny_engine, make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch name -> (checkpoint dir, HF model in fp32 eval mode)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_checkpoint(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def graphs(checkpoints):
    """arch name -> (the graph `engine build` makes, fp32, and its weights)."""
    from tests.test_kv_quant import build_graph

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_graph(checkpoints(arch)[0])
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def engines(tmp_path_factory, checkpoints):
    """(arch, dtype) -> engine dir built with default options."""
    root = tmp_path_factory.mktemp("engines")
    cache: dict = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            ckpt, _ = checkpoints(arch)
            cache[(arch, dtype)] = build_tiny_engine(ckpt, root / f"{arch}-{dtype}", dtype=dtype)
        return cache[(arch, dtype)]

    return get


@pytest.fixture(scope="session")
def built(tmp_path_factory, checkpoints):
    """(arch, **build options) -> engine dir, built once per session."""
    root = tmp_path_factory.mktemp("built")
    cache: dict = {}

    def get(arch: str, **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            ckpt, _ = checkpoints(arch)
            cache[key] = build_tiny_engine(ckpt, root / f"{arch}-{len(cache)}", **options)
        return cache[key]

    return get


__all__ = ["ARCHS"]
