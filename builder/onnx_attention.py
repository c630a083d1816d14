"""The ONNX lowering of paged attention: one fused `Attention` node (ONNX opset 23) per layer
over the runtime's paged KV cache.

Per layer: q/k/v are taken as [1, T, heads·d] token rows (straight from the projection where
the plan allows, `token_rows`), RoPE applied (onnxruntime's RotaryEmbedding when the plan's
tables allow, `rope_tables_ok`, else the standard-op `rope` of onnx_ops), the new K/V
recorded for the graph's `kv_new` output (quantized to the cache's codes for an int8 / fp8
cache), the step's rows laid out as [sequences, longest chunk] by `attn.q_index`, this
layer's earlier context gathered from its own cache input by slot (`attn.ctx_slots`), and
one `Attention` node attends with the step's additive mask (GQA / MQA through its
`kv_num_heads`, sliding windows through their own masks, ALiBi by adding per-head slopes
times the `attn.rel_pos` input to it). The graph inputs this reads
(`attn.*`, `kv_cache.<layer>.k|v`) are declared by `_Emitter.build` in onnx_export, whose
docstring has the contract with the runtime. `attention_rows` lets onnx_ops' reshape reuse the
output rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from llm_engine.builder.onnx_emitter import DTYPES, EmitterCore, Unsupported

INT8_MAX = 127.0
REL_POS = "attn.rel_pos"  # [B, 1, Tq, C + Tq] key position - query position (ALiBi models)


def cache_input(layer: int, half: str) -> str:
    """The graph input holding one layer's K or V cache rows, [slots, kv_heads·head_dim]."""
    return f"kv_cache.{layer}.{half}"


class PagedAttention(EmitterCore):
    def op_paged_attention(self, n, ins, attrs):
        if attrs.get("kv_head_map") is not None:
            raise Unsupported("attention with a per-rank kv_head_map (tensor parallel)")
        q_shape = n["shape"]
        if len(q_shape) != 4 or q_shape[0] != 1:
            raise Unsupported(f"attention output shape {q_shape}")
        layer = attrs["layer"]
        if attrs.get("kv_dtype") == "float8_e4m3fn":
            # ONNX's Gather and Concat take no float8 tensors and opset 23 has no bitcast to
            # move the codes as bytes; int8 caches run here.
            raise Unsupported("fp8 KV cache (ONNX gathers no float8 tensors; use "
                              "--kv-cache-dtype int8 for the CPU fast path)")
        h, kvh, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        if h is None or kvh is None or d is None or h % kvh:
            raise Unsupported("attention without uniform head grouping")
        has_rope = len(ins) > 7 and ins[7] is not None
        fast_rope = has_rope and self.rope_tables_ok(n["inputs"][7], n["inputs"][8], d)

        def rows(i: int, heads: int, rotate: bool) -> str:  # -> [1, T, heads*d], RoPE applied
            direct = self.token_rows(n["inputs"][i], heads, d)
            if direct is not None and (fast_rope or not rotate):
                return self.rotary(direct, n["inputs"][7], n["inputs"][8], d, heads) \
                    if rotate else direct
            x = ins[i]  # [1, heads, T, d]
            if rotate:
                x = (self.rotary(x, n["inputs"][7], n["inputs"][8], d, heads) if fast_rope
                     else self.rope(x, ins[7], ins[8], d))
            return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]),
                           self.const([1, -1, heads * d]))

        q, k, v = rows(0, h, has_rope), rows(1, kvh, has_rope), rows(2, kvh, False)
        k, v = self.kv_store(layer, attrs, k, v, kvh, d)

        def padded(x: str, width: int) -> str:  # [1, T, width] -> [B, Tq, width]
            return self.op("Gather", self.op("Reshape", x, self.const([-1, width])),
                           "attn.q_index", axis=0)

        window = attrs.get("window")
        mask = "attn.mask" if window is None else f"attn.mask.w{int(window)}"
        if window is not None:
            self.windows.add(int(window))
        keys = self.op("Concat", self.past(layer, "k", attrs), padded(k, kvh * d), axis=1)
        values = self.op("Concat", self.past(layer, "v", attrs), padded(v, kvh * d), axis=1)
        if attrs.get("alibi"):
            mask = self.alibi_mask(mask, attrs["alibi"], h)
        if attrs.get("sinks"):
            keys, values, mask = self.sink_column(keys, values, mask, attrs["sinks"], h)
        softcap = {"softcap": float(attrs["softcap"])} if attrs.get("softcap") else {}
        out = self.op("Attention", padded(q, h * d), keys, values, mask, q_num_heads=h,
                      kv_num_heads=kvh, scale=float(attrs["scale"]), **softcap)  # [B, Tq, h*d]
        out = self.op("Gather", self.op("Reshape", out, self.const([-1, h * d])),
                      "attn.out_index", axis=0)  # [T, h*d], the flat tokens again
        self.attn_rows[n["name"]] = self.op("Unsqueeze", out, self.const([0]))
        return self.op("Transpose", self.op("Reshape", out, self.const([1, -1, h, d])),
                       perm=[0, 2, 1, 3])

    def alibi_mask(self, mask: str, slopes: list[float], h: int) -> str:
        """ALiBi (MPT) through the standard op: slopes[h] * (key position - query position)
        added to the step's mask, which so gets a head axis ([B, h, Tq, C + Tq]). The relative
        positions are the runtime's `attn.rel_pos` input, laid out as the mask; layers with the
        same slopes and mask share the sum."""
        if len(slopes) != h:
            raise Unsupported(f"ALiBi: {len(slopes)} slopes for {h} heads")
        slope = self.const(np.asarray(slopes, np.float32).reshape(1, h, 1, 1), np.float32)
        return self.step_once(("alibi", mask, tuple(slopes)), lambda: self.op(
            "Add", mask, self.op("Mul", REL_POS, slope)))

    def sink_column(self, keys: str, values: str, mask: str, sinks: list[float], h: int
                    ) -> tuple[str, str, str]:
        """Attention sinks (gpt-oss) through the standard op: one more key and value, both
        zero, whose score (0) plus its mask column (the head's sink) is the sink logit; the
        mask gets a head axis for it ([B, h, Tq, C + 1])."""
        if len(sinks) != h:
            raise Unsupported(f"attention sinks: {len(sinks)} values for {h} heads")
        zero = self.op("Mul", self.op("Slice", keys, self.const([0]), self.const([1]),
                                      self.const([1])), self.const(0.0, np.float32))
        keys = self.op("Concat", keys, zero, axis=1)
        values = self.op("Concat", values, zero, axis=1)
        shape = self.op("Shape", mask)  # [B, 1, Tq, C]
        b, tq = (self.op("Slice", shape, self.const([i]), self.const([i + 1])) for i in (0, 2))
        per_head = self.op("Expand", mask, self.op("Concat", b, self.const([h]), tq,
                                                   self.op("Slice", shape, self.const([3]),
                                                           self.const([4])), axis=0))
        column = self.op("Expand", self.const(np.asarray(sinks, np.float32).reshape(1, h, 1, 1),
                                              np.float32),
                         self.op("Concat", b, self.const([h]), tq, self.const([1]), axis=0))
        return keys, values, self.op("Concat", per_head, column, axis=3)

    def kv_store(self, layer: int, attrs: dict[str, Any], k: str, v: str, kvh: int, d: int
                 ) -> tuple[str, str]:
        """Record this step's K/V rows ([1, T, kvh*d]) for `kv_new` in the cache's dtype and
        return the values attention reads for them: for a quantized cache the codes read
        back (code * scale), as the reference attends over what it stored."""
        dtype = self.kv_layers[layer]["dtype"]
        elem = DTYPES[dtype]
        if not attrs.get("kv_dtype"):
            for x in (k, v):
                self.kv_outputs.append(x if elem == TensorProto.FLOAT
                                       else self.op("Cast", x, to=elem))
            return k, v
        if dtype != "int8":
            raise Unsupported(f"KV cache dtype {dtype}")
        out = []
        for x, half in ((k, "k"), (v, "v")):
            scale = self.kv_scale_row(attrs, half, kvh, d)
            y = self.op("Clip", self.op("Round", self.op("Div", x, scale)),
                        self.const(-INT8_MAX, np.float32), self.const(INT8_MAX, np.float32))
            codes = self.op("Cast", y, to=elem)
            self.kv_outputs.append(codes)
            out.append(self.dequantize(codes, scale))
        return out[0], out[1]

    def kv_scale_row(self, attrs: dict[str, Any], half: str, kvh: int, d: int) -> str:
        """A quantized cache's per-KV-head scales repeated over each head's d columns."""
        scales = attrs.get(f"{half}_scale")
        if not isinstance(scales, list) or len(scales) != kvh:
            raise Unsupported(f"quantized KV cache without {kvh} {half}_scale values")
        return self.const(np.repeat(np.asarray(scales, np.float32), d), np.float32)

    def dequantize(self, codes: str, scale: str) -> str:
        return self.op("Mul", self.op("Cast", codes, to=TensorProto.FLOAT), scale)

    def past(self, layer: int, half: str, attrs: dict[str, Any]) -> str:
        """This layer's K or V of the earlier context, [B, C, kvh*d], gathered from its cache
        input by the step's context slots."""
        rows = self.op("Gather", cache_input(layer, half), "attn.ctx_slots", axis=0)
        if not attrs.get("kv_dtype"):
            return self.as_float(rows, self.kv_layers[layer]["dtype"])
        kvh, d = attrs["num_kv_heads"], attrs["head_dim"]
        return self.dequantize(rows, self.kv_scale_row(attrs, half, kvh, d))

    def attention_rows(self, n: dict[str, Any]) -> str | None:
        """The plan turns attention's [1, h, T, d] back into [1, T, h*d] with
        reshape(transpose(attention, 1, 2)) (an identity reshape may sit in between); the
        graph already has those rows, so the chain costs nothing."""
        t = self.nodes_by_name[n["inputs"][0]]
        if len(n["shape"]) != 3 or t["op"] != "transpose" \
                or {t["attrs"]["dim0"] % 4, t["attrs"]["dim1"] % 4} != {1, 2}:
            return None
        src = self.nodes_by_name[t["inputs"][0]]
        if src["op"] == "reshape" and src["shape"] == self.nodes_by_name[src["inputs"][0]]["shape"]:
            src = self.nodes_by_name[src["inputs"][0]]
        if src["name"] not in self.attn_rows or n["shape"][2] != src["shape"][1] * src["shape"][3]:
            return None
        return self.attn_rows[src["name"]]

    def token_rows(self, name: str, heads: int, d: int) -> str | None:
        """The [1, T, heads*d] ONNX value behind an attention input that the plan formed as
        transpose(reshape([1, T, heads*d] -> [1, T, heads, d]), 1, 2), so the graph can skip
        the round trip through [1, heads, T, d]; None for any other producer."""
        node = self.nodes_by_name[name]
        if node["op"] != "transpose" or {node["attrs"]["dim0"] % 4, node["attrs"]["dim1"] % 4} \
                != {1, 2}:
            return None
        view = self.nodes_by_name[node["inputs"][0]]
        src = self.nodes_by_name[view["inputs"][0]] if view["op"] == "reshape" else None
        if src is None or view["shape"][2:] != [heads, d] or len(src["shape"]) != 3 \
                or src["shape"][2] != heads * d or src["shape"][0] != 1:
            return None
        return self.values[src["name"]]

    def rope_tables_ok(self, cos: str, sin: str, dim: int) -> bool:
        """onnxruntime's RotaryEmbedding takes half-width tables: usable when the plan's
        [1, 1, T, d] cos/sin are elementwise functions of cat(f, f) on the last axis (HF's
        rotate-half tables), so both halves are equal."""
        for name in (cos, sin):
            shape = self.nodes_by_name[name]["shape"]
            if len(shape) != 4 or shape[:2] != [1, 1] or shape[3] != dim or dim % 2:
                return False
            for _ in range(8):
                node = self.nodes_by_name[name]
                rank = len(node["shape"]) if isinstance(node["shape"][0], (int, str)) else 0
                if node["op"] == "cat":
                    ins = node["inputs"]
                    if not (len(ins) == 2 and ins[0] == ins[1]
                            and node["attrs"]["dim"] in (-1, rank - 1)):
                        return False
                    break
                if (node["op"] == "unsqueeze" and node["attrs"]["dim"] not in (-1, rank - 1)) or (node["op"] in ("pointwise", "to_dtype") and len(node["inputs"]) == 1):
                    name = node["inputs"][0]
                else:
                    return False
            else:
                return False
        return True

    def rotary(self, x: str, cos: str, sin: str, dim: int, heads: int) -> str:
        """RoPE as one onnxruntime RotaryEmbedding node on x ([1, T, heads*d] or
        [1, heads, T, d]): the step's own tables (plan values `cos`, `sin`: rows 0..T-1, first
        halves) with positions 0..T-1 select row t for token t. The tables and positions are
        built once per step from the plan value the layers' views of the tables share."""
        def table(name: str) -> str:
            root = self.table_root(name)
            return self.step_once(("rope", root), lambda: self.op(
                "Slice", self.op("Reshape", self.values[root], self.const([-1, dim])),
                self.const([0]), self.const([dim // 2]), self.const([1])))

        cos_half = table(cos)
        positions = self.step_once(("rope_pos", cos_half), lambda: self.op(
            "Unsqueeze", self.op("Range", self.const(0), self.op(
                "Squeeze", self.op("Shape", cos_half, start=0, end=1), self.const([0])),
                self.const(1)), self.const([0])))
        return self.op("RotaryEmbedding", x, positions, cos_half, table(sin),
                       domain="com.microsoft", interleaved=0, num_heads=heads)

    def table_root(self, name: str) -> str:
        """The plan value behind a RoPE table once the per-layer unsqueezes are skipped."""
        node = self.nodes_by_name[name]
        while node["op"] == "unsqueeze":
            node = self.nodes_by_name[node["inputs"][0]]
        return node["name"]
