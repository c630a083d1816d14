"""The ONNX lowerings of GEMMs: `linear` once per weight format of `kernels.formats`, and
the plain activation-by-activation `matmul`.

`GemmLowerings.LINEAR` maps every format name to its lowering (tests/test_formats.py checks
it covers `formats.FORMATS`), each (node, x, weight operands, N, K, attrs) -> (output, the
lowering's name for report.json). Where onnxruntime's kernel wants another layout (int8
codes as offset uint8, transposed dense matrices, packed zero points) the graph states the
conversion on the initializer and onnxruntime folds it once at load. Quantized GEMMs use
`MatMulNBits` (4- and 8-bit, blockwise, activations quantized to int8 per block of K:
accuracy_level 4), the kernel onnxruntime-genai uses; SmoothQuant's W8A8 uses the u8s8
`DynamicQuantizeMatMul`, much faster for many rows; fp8 weights are dequantized at load and
activations rounded through e4m3 as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
from onnx import TensorProto

from llm_engine.builder.onnx_emitter import EmitterCore, Unsupported
from llm_engine.kernels import formats

# MatMulNBits takes power-of-two blocks of K from 16 up.
_NBITS_BLOCKS = (16, 32, 64, 128, 256)


INT8_BLOCK = 16
# The LM head's blocks: its activation rounding touches only the last GEMM, while the scale
# array the block repeats is largest there (vocab x K/16 floats: 7 MB for SmolLM2). SmolLM2
# int4-awq, LM head at blocks of 16 / 32 / 64: perplexity 21.107 / 21.119 / 21.147 (engine eval,
# builtin text), batch-1 decode +6% / +8% over 16 (medians of 6 alternating runs, noisy here).
LM_HEAD_INT8_BLOCK = 32


class GemmLowerings(EmitterCore):
    def op_matmul(self, n, ins, attrs):
        return self.op("MatMul", ins[0], ins[1])

    def op_linear(self, n, ins, attrs):
        try:
            fmt = formats.of(attrs)
        except ValueError as e:
            raise Unsupported(f"linear: {e}") from None
        lower = self.LINEAR.get(fmt.name)
        if lower is None:
            raise Unsupported(f"linear format {fmt.name!r}")
        w_node = self.nodes_by_name[n["inputs"][1]]
        n_out, k = w_node["shape"][0], w_node["shape"][-1] * fmt.channels_per_col
        operands = fmt.operands
        bias = ins[1 + operands] if len(ins) > 1 + operands else None
        y, kind = lower(self, n, ins[0], ins[1:1 + operands], n_out, k, attrs)
        self.lowerings[kind] = self.lowerings.get(kind, 0) + 1
        if bias is not None:
            bias_dtype = self.nodes_by_name[n["inputs"][1 + operands]]["dtype"]
            y = self.op("Add", y, self.as_float(bias, bias_dtype))
        return y

    # One lowering per weight format (`kernels.formats`), each (node, x, weight operands,
    # N, K, attrs) -> (output, the lowering's name for the report).
    def _linear_dense(self, n, x, w, n_out, k, attrs):
        w_node = self.nodes_by_name[n["inputs"][1]]
        w = self.as_float(w[0], w_node["dtype"])
        return self.op("MatMul", x, self.op("Transpose", w, perm=[1, 0])), "MatMul (fp32)"

    def _linear_int4_group(self, n, x, w, n_out, k, attrs):
        float_zero = self.nodes_by_name[n["inputs"][3]]["dtype"] != "uint8"
        return self.int4(x, *w, n_out, k, attrs["group_size"], float_zero)

    def _linear_int8_channel(self, n, x, w, n_out, k, attrs):
        block = LM_HEAD_INT8_BLOCK if n["name"] in self.plan["outputs"] else INT8_BLOCK
        return self.int8(x, *w, n_out, k, block)

    def _linear_int8_channel_a8(self, n, x, w, n_out, k, attrs):
        rank = len(self.nodes_by_name[n["inputs"][0]]["shape"])
        return self.int8_a8(x, *w, n_out, k, rank)

    def _linear_fp8_channel_a8(self, n, x, w, n_out, k, attrs):
        return self.fp8(x, *w)

    def _linear_fp8_channel_a8_token(self, n, x, w, n_out, k, attrs):
        return self.fp8_token(x, *w)

    def _linear_fp8_channel_a8_group(self, n, x, w, n_out, k, attrs):
        rank = len(self.nodes_by_name[n["inputs"][0]]["shape"])
        return self.fp8_group(x, *w, k, rank, attrs["group_size"])

    LINEAR: ClassVar[dict[str, Callable]] = {
        "dense": _linear_dense, "int4_group": _linear_int4_group,
        "int8_channel": _linear_int8_channel, "int8_channel_a8": _linear_int8_channel_a8,
        "fp8_channel_a8": _linear_fp8_channel_a8,
        "fp8_channel_a8_token": _linear_fp8_channel_a8_token,
        "fp8_channel_a8_group": _linear_fp8_channel_a8_group,
    }

    def int4(self, x, packed, scales, zeros, n_out, k, group, float_zero):
        blocks = k // group
        if group not in _NBITS_BLOCKS:
            # MatMulNBits takes power-of-two groups only: dequantize once at load instead.
            lo = self.op("BitwiseAnd", packed, self.const(15, np.uint8))
            hi = self.op("BitShift", packed, self.const(4, np.uint8), direction="RIGHT")
            q = self.op("Concat", self.op("Unsqueeze", lo, self.const([-1])),
                        self.op("Unsqueeze", hi, self.const([-1])), axis=-1)
            q = self.op("Cast", self.op("Reshape", q, self.const([n_out, blocks, group])),
                        to=TensorProto.FLOAT)
            z = self.op("Cast", self.op("Unsqueeze", zeros, self.const([-1])),
                        to=TensorProto.FLOAT)
            w = self.op("Mul", self.op("Sub", q, z),
                        self.op("Unsqueeze", scales, self.const([-1])))
            w = self.op("Reshape", w, self.const([n_out, k]))
            return (self.op("MatMul", x, self.op("Transpose", w, perm=[1, 0])),
                    f"MatMul (int4 g{group} dequantized)")
        # Our packing is MatMulNBits' B byte for byte ([N, K/2], low nibble = even column);
        # only the zero points need two to a byte, which the graph does on the initializer.
        b = self.op("Reshape", packed, self.const([n_out, blocks, group // 2]))
        s = self.op("Reshape", scales, self.const([-1]))
        if not float_zero:  # uint8 zero points: engines from before float ones
            z = self.pack_zero_points(zeros, n_out, blocks)
            y = self.op("MatMulNBits", x, b, s, z, domain="com.microsoft", K=k, N=n_out,
                        bits=4, block_size=group, accuracy_level=4)
            return y, f"MatMulNBits 4-bit g{group}"
        # MatMulNBits takes float zero points too, but then leaves its fast kernels (9-30x
        # slower at one row here). So it gets the nearest integers, and the rest is llama.cpp's
        # Q4_1 trick: (q - z) s = (q - round(z)) s - (z - round(z)) s, and the last term is
        # one number per (row, group), so its product with x is x's per-group sums [.., K/G]
        # (x times a 0/1 [K, K/G] matrix: one op, where Reshape + ReduceSum are two) times a
        # [K/G, N] matrix. Three small ops, ~8 us per GEMM at one row.
        zi = self.op("Round", zeros)
        y = self.op("MatMulNBits", x, b, s, self.pack_zero_points(zi, n_out, blocks),
                    domain="com.microsoft", K=k, N=n_out, bits=4, block_size=group,
                    accuracy_level=4)
        frac = self.op("Transpose", self.op("Mul", self.op("Sub", zeros, zi), scales),
                       perm=[1, 0])
        member = np.zeros((k, blocks), np.float32)
        member[np.arange(k), np.arange(k) // group] = 1.0
        sums = self.op("MatMul", x, self.const(member, np.float32))
        return self.op("Sub", y, self.op("MatMul", sums, frac)), \
            f"MatMulNBits 4-bit g{group} + zero-point offsets"

    def pack_zero_points(self, zeros: str, n_out: int, blocks: int) -> str:
        if blocks % 2:
            zeros = self.op("Pad", zeros, self.const([0, 0, 0, 1]))
            blocks += 1
        z = self.op("Cast", self.op("Reshape", zeros, self.const([n_out, blocks // 2, 2])),
                    to=TensorProto.INT32)
        lo = self.op("Gather", z, self.const(0), axis=2)
        hi = self.op("Mul", self.op("Gather", z, self.const(1), axis=2), self.const(16, np.int32))
        packed = self.op("Cast", self.op("Add", lo, hi), to=TensorProto.UINT8)
        return self.op("Reshape", packed, self.const([-1]))

    def int8(self, x, q, scale, n_out, k, block=INT8_BLOCK):
        # One scale per channel, repeated over blocks of K (zero-padded where 16 does not divide
        # K). The kernel rounds activations to int8 per block of K, so the block sets that
        # error: on SmolLM2 blocks of 64/128 cost +0.86% perplexity, 32 +0.43%, 16 +0.31%
        # (weight-only arithmetic: +0.07%); a quick batch-1 check saw no slowdown beyond noise.
        blocks = -(-k // block)
        # Symmetric int8 codes -> MatMulNBits' unsigned codes with zero point 128.
        u = self.op("Cast", self.op("Add", self.op("Cast", q, to=TensorProto.INT32),
                                    self.const(128, np.int32)), to=TensorProto.UINT8)
        if blocks * block != k:
            u = self.op("Pad", u, self.const([0, 0, 0, blocks * block - k]),
                        self.const(128, np.uint8))
        b = self.op("Reshape", u, self.const([n_out, blocks, block]))
        s = self.op("Reshape", self.op("Expand", self.op("Unsqueeze", scale, self.const([1])),
                                       self.const([n_out, blocks])), self.const([-1]))
        z = self.const(np.full(n_out * blocks, 128, np.uint8), np.uint8)
        y = self.op("MatMulNBits", x, b, s, z, domain="com.microsoft", K=k, N=n_out, bits=8,
                    block_size=block, accuracy_level=4)
        return y, f"MatMulNBits 8-bit g{block}"

    def int8_a8(self, x, q, scale, n_out, k, rank):
        """W8A8 with per-token dynamic activation scales on onnxruntime's u8s8 GEMM, whose
        activation quantization is per tensor: rows are scaled to amax 1 and an anchor row
        (1, -1, 0, ...) pins the tensor's range to [-1, 1], so every token gets the same
        255-level grid over its own range whatever else is in the batch."""
        amax = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]),
                                      keepdims=1), self.const(1e-30, np.float32))
        anchor = np.zeros((1,) * (rank - 1) + (k,), np.float32)
        anchor[..., 0], anchor[..., 1 % k] = 1.0, -1.0
        rows = self.op("Concat", self.op("Div", x, amax), self.const(anchor, np.float32),
                       axis=-2)
        # u8s8 on AVX2 multiplies with VPMADDUBSW, whose int16 pair sums saturate with full
        # 8-bit weights; unsigned weights (zero point 128) take the u8u8 kernel, which does not.
        u = self.op("Cast", self.op("Add", self.op("Cast", q, to=TensorProto.INT32),
                                    self.const(128, np.int32)), to=TensorProto.UINT8)
        y = self.op("DynamicQuantizeMatMul", rows, self.op("Transpose", u, perm=[1, 0]), scale,
                    self.const(np.full(n_out, 128, np.uint8), np.uint8), domain="com.microsoft")
        y = self.op("Slice", y, self.const([0]), self.const([-1]), self.const([-2]))
        return self.op("Mul", y, amax), "DynamicQuantizeMatMul (per-token int8)"

    def fp8(self, x, q, scale, x_scale):
        # Weights dequantized once at load; activations rounded through e4m3 with the static
        # calibration scale, as the reference does.
        return self.op("Mul", self.e4m3_matmul(x, x_scale, q, scale), x_scale), \
            "MatMul (fp8 dequantized)"

    def fp8_token(self, x, q, scale):
        # As fp8, with each row's own scale amax|x_row| / 448 (an all-zero row stays zero).
        a = self.e4m3_scale(x)
        return self.op("Mul", self.e4m3_matmul(x, a, q, scale), a), \
            "MatMul (fp8 per-token, dequantized)"

    def fp8_group(self, x, q, scale, k, rank, group):
        # As fp8_token, one scale per token and group of `group` channels: x viewed as
        # [..., K / group, group], each group rounded through e4m3 on its own amax, then the
        # dequantized x (xq * a) times the dequantized weight.
        keep = [0] * (rank - 1)
        xg = self.op("Reshape", x, self.const([*keep, k // group, group]))
        a = self.e4m3_scale(xg)
        xd = self.op("Reshape", self.op("Mul", self.e4m3(xg, a), a), self.const([*keep, k]))
        return self.op("MatMul", xd, self.fp8_weight_t(q, scale)), \
            f"MatMul (fp8 per-token-group g{group}, dequantized)"

    def e4m3_scale(self, x):
        """amax|x| / 448 over the last axis, kept (a zero row gets a tiny scale: it stays 0)."""
        amax = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]),
                                      keepdims=1), self.const(1e-30, np.float32))
        return self.op("Div", amax, self.const(448.0, np.float32))

    def e4m3(self, x, a):
        """e4m3(clamp(x / a, +-448)) as float, a broadcasting against x."""
        xs = self.op("Clip", self.op("Div", x, a), self.const(-448.0, np.float32),
                     self.const(448.0, np.float32))
        return self.op("Cast", self.op("Cast", xs, to=TensorProto.FLOAT8E4M3FN),
                       to=TensorProto.FLOAT)

    def fp8_weight_t(self, q, scale):
        """(q * scale[:, None])^T as float: the fp8 weight dequantized (once, at load)."""
        w = self.op("Mul", self.op("Cast", q, to=TensorProto.FLOAT),
                    self.op("Unsqueeze", scale, self.const([1])))
        return self.op("Transpose", w, perm=[1, 0])

    def e4m3_matmul(self, x, a, q, scale):
        """e4m3(x / a) @ (q * scale)^T, a broadcasting against x."""
        return self.op("MatMul", self.e4m3(x, a), self.fp8_weight_t(q, scale))

