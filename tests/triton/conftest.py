"""Kernel tests run the rendered Triton kernels under the interpreter when no GPU is present.
The variable must be set before any rendered module is imported (triton reads it when a
kernel is decorated)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="session")
def interpreter_bf16():
    """Make the Triton 3.9 interpreter's bfloat16 behave as on the GPU. It stores bf16 as
    uint16 bit patterns, and (1) tl.dot multiplies those integers, (2) fp32 -> bf16 casts
    truncate where the GPU's cvt.rn (and torch) round to nearest even. Both are interpreter
    bugs, not kernel behaviour, so the kernels' GPU code stays unchanged."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))
            bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        return cast(self, src, dst_type)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", create_dot)
        mp.setattr(InterpreterBuilder, "cast_impl", cast_impl)
        yield


def pytest_collection_modifyitems(items):
    """The slow kernel tests are shape/dtype sweeps (about 12 minutes in the interpreter): mark
    them `sweep` so `make test` can leave them to `make test-all`."""
    for item in items:
        # The hook sees the whole session's items, not only this directory's.
        in_here = "triton/" in item.nodeid.replace("\\", "/")
        if in_here and item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.sweep)
