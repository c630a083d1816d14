"""The weight-format registry (`kernels/formats.py`): every format is one value that the torch
reference, the quantize pass, the partitioner, the Triton GEMM checker and the ONNX exporter
all take from. Each format is checked here for what its entry declares: that its parts
dequantize to what it quantized, that its reference linear computes x @ W^T with them, that
cutting each part as declared (`Part.rows`, `Part.cols`) gives exactly the shard of W a
tensor-parallel split needs, and that every consumer registered a lowering for it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_engine.kernels import formats

NAMES = sorted(formats.FORMATS)
N, K, G = 48, 64, 16  # G divides K and each half of it


def _parts(fmt: formats.WeightFormat, w: torch.Tensor) -> list[torch.Tensor]:
    if fmt.quantize is None:
        return [w]
    parts = fmt.quantize(w, group_size=G)
    return [*parts, *(torch.tensor([0.01]) for _ in fmt.parts[len(parts):])]  # calibrated


def _skip_without_fp8(name: str) -> None:
    if name.startswith("fp8") and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8_e4m3fn")


@pytest.mark.parametrize("name", NAMES)
def test_parts_dequantize_and_multiply_as_declared(name):
    _skip_without_fp8(name)
    fmt = formats.get(name)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.1
    x = torch.randn(5, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    parts = _parts(fmt, w)
    assert len(parts) == fmt.operands == len(fmt.parts)
    group = G if fmt.grouped else None
    W = fmt.dequantize(*parts, group_size=group)
    assert W.shape == (N, K)
    # within half the format's step: int4's is a group's span / 15, int8's a row's amax / 127,
    # e4m3's (3 mantissa bits) up to 1/8 of the value
    amax = w.abs().max().item()
    tol = {"dense": 0.0, "int4_group": amax / 15, "int8_channel": amax / 254,
           "int8_channel_a8": amax / 254}.get(name, amax / 16)
    assert (W - w).abs().max().item() <= tol + 1e-7
    y = fmt.linear(x, *parts, group_size=group, bias=bias)
    want = F.linear(x, W, bias)
    # weight-only formats compute with W itself; the "_a8" ones also round x (to 8 bits)
    rel = (y - want).norm() / want.norm()
    assert rel <= (1e-5 if not fmt.activations else 0.08), rel


@pytest.mark.parametrize("name", NAMES)
def test_cutting_the_parts_as_declared_shards_w(name):
    """Rows (a column-parallel split) and input channels (a row-parallel split), cut part by
    part as the entry declares, dequantize to exactly that shard of W."""
    _skip_without_fp8(name)
    fmt = formats.get(name)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.1
    parts = _parts(fmt, w)
    group = G if fmt.grouped else None
    W = fmt.dequantize(*parts, group_size=group)
    rows, cols = slice(8, 24), range(K // 2, K)
    by_rows = [p[rows] if part.rows else p for part, p in zip(fmt.parts, parts, strict=True)]
    assert torch.equal(fmt.dequantize(*by_rows, group_size=group), W[rows])

    def cut(part, p):
        if part.cols == "channel":
            return p[:, cols.start:cols.stop]
        if part.cols == "pair":
            return p[:, cols.start // 2:cols.stop // 2]
        if part.cols == "group":
            return p[:, cols.start // G:cols.stop // G]
        return p

    by_cols = [cut(part, p) for part, p in zip(fmt.parts, parts, strict=True)]
    assert torch.equal(fmt.dequantize(*by_cols, group_size=group), W[:, cols.start:cols.stop])


def test_every_consumer_registers_every_format():
    from llm_engine.builder.onnx_export import _Emitter
    from llm_engine.kernels.codegen import allowed_words
    from llm_engine.kernels.triton import gemm

    assert set(gemm.FORMATS) == set(formats.FORMATS)  # the Triton GEMM checker
    assert set(_Emitter.LINEAR) == set(formats.FORMATS)  # the CPU fast path's lowering
    assert set(formats.FORMATS) <= allowed_words()  # a plan may name it in a kernel
    for fmt in formats.FORMATS.values():
        suffixes = [p.suffix for p in fmt.parts]
        assert len(set(suffixes)) == len(suffixes), fmt.name  # one weight name per part
        assert fmt.grouped == any(p.cols == "group" for p in fmt.parts) or fmt.activations


def test_an_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown weight format 'int3'.*int4_group"):
        formats.get("int3")
    assert formats.of({}).name == "dense"
