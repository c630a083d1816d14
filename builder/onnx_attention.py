"""The ONNX lowering of paged attention, in standard (and com.microsoft) ops over the
runtime's paged KV cache.

Per layer: q/k/v are taken as [T, heads, d] token rows (skipping the plan's round trip
through [1, heads, T, d] where it allows, `token_rows`), RoPE applied (onnxruntime's
RotaryEmbedding when the plan's tables allow, `rope_tables_ok`, else the standard-op `rope`
of onnx_ops), the new K/V recorded for the graph's `kv_new` output, earlier context gathered
from `kv_cache` by slot, and the scores masked with the step's additive mask: GQA/MQA with
few KV heads by `attend_grouped`, MHA by `attend_heads`. The graph inputs this reads
(`attn.*`, `kv_cache`) are declared by `_Emitter.build` in onnx_export, whose docstring has
the contract with the runtime. `attention_rows` lets onnx_ops' reshape reuse the output rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from llm_engine.builder.onnx_emitter import DTYPES, EmitterCore, Unsupported


class PagedAttention(EmitterCore):
    def op_paged_attention(self, n, ins, attrs):
        if attrs.get("kv_head_map") is not None:
            raise Unsupported("attention with a per-rank kv_head_map (tensor parallel)")
        if attrs.get("kv_dtype"):
            raise Unsupported(f"quantized KV cache ({attrs['kv_dtype']})")
        q_shape = n["shape"]
        if len(q_shape) != 4 or q_shape[0] != 1:
            raise Unsupported(f"attention output shape {q_shape}")
        layer = attrs["layer"]
        h, kvh, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        if h is None or kvh is None or d is None or h % kvh:
            raise Unsupported("attention without uniform head grouping")
        q, k, v = ins[0], ins[1], ins[2]
        rows = [self.token_rows(name, heads, d) for name, heads in
                zip(n["inputs"][:3], (h, kvh, kvh))]
        fast_rope = len(ins) > 7 and ins[7] is not None and self.rope_tables_ok(
            n["inputs"][7], n["inputs"][8], d)

        def flat(x, heads):  # [1, heads, T, d] -> [T, heads, d]
            return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]),
                           self.const([-1, heads, d]))

        def prepared(x, heads, token_rows, rotate):  # -> [T, heads, d], RoPE applied
            if token_rows is not None:  # [1, T, heads*d] straight from the projection
                if rotate:
                    token_rows = self.rotary(token_rows, ins[7], ins[8], d, heads)
                return self.op("Reshape", token_rows, self.const([-1, heads, d]))
            if rotate:
                x = (self.rotary(x, ins[7], ins[8], d, heads) if fast_rope
                     else self.rope(x, ins[7], ins[8], d))
            return flat(x, heads)

        has_rope = len(ins) > 7 and ins[7] is not None
        qf = prepared(q, h, rows[0] if fast_rope else None, has_rope)
        kf = prepared(k, kvh, rows[1] if fast_rope else None, has_rope)
        vf = prepared(v, kvh, rows[2], False)
        cache_dtype = DTYPES[self.kv_layers[layer]["dtype"]]
        k_store, v_store = kf, vf
        if cache_dtype != TensorProto.FLOAT:
            k_store = self.op("Cast", kf, to=cache_dtype)
            v_store = self.op("Cast", vf, to=cache_dtype)
        self.kv_outputs += [k_store, v_store]

        window = attrs.get("window")
        mask = "attn.mask" if window is None else f"attn.mask.w{int(window)}"
        if window is not None:
            self.windows.add(int(window))
        qp = self.op("Gather", qf, "attn.q_index", axis=0)  # [B, Tq, h, d]

        def past(half):  # this layer's K or V of the earlier context: [B, C, kvh, d]
            offset = self.op("Mul", "attn.layer_stride", self.const([2 * layer + half]))
            rows = self.op("Gather", "kv_cache", self.op("Add", "attn.ctx_slots", offset), axis=0)
            return rows if cache_dtype == TensorProto.FLOAT else self.op(
                "Cast", rows, to=TensorProto.FLOAT)

        kp, vp = past(0), past(1)
        kc = self.op("Gather", kf, "attn.q_index", axis=0)  # [B, Tq, kvh, d]
        vc = self.op("Gather", vf, "attn.q_index", axis=0)
        scale = self.const(float(attrs["scale"]), np.float32)
        if kvh <= 4:
            out = self.attend_grouped(qp, kp, vp, kc, vc, mask, scale, h, kvh, d)
        else:
            out = self.attend_heads(qp, kp, vp, kc, vc, mask, scale, h, kvh, d)
        # [B, Tq, h, d] -> the flat tokens -> the op's [1, h, T, d]
        out = self.op("Gather", self.op("Reshape", out, self.const([-1, h * d])),
                      "attn.out_index", axis=0)  # [T, h*d]
        self.attn_rows[n["name"]] = self.op("Unsqueeze", out, self.const([0]))
        return self.op("Transpose", self.op("Reshape", out, self.const([1, -1, h, d])),
                       perm=[0, 2, 1, 3])

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

    def rotary(self, x, cos, sin, dim, heads):
        """RoPE as one onnxruntime RotaryEmbedding node on [1, heads, T, d]: the step's own
        tables (rows 0..T-1, first halves) with positions 0..T-1 select row t for token t."""
        def table(t):
            return self.step_once(("rope", t), lambda: self.op(
                "Slice", self.op("Reshape", t, self.const([-1, dim])), self.const([0]),
                self.const([dim // 2]), self.const([1])))

        positions = self.step_once(("rope_pos", cos), lambda: self.op(
            "Unsqueeze", self.op("Range", self.const(0), self.op(
                "Squeeze", self.op("Shape", cos, start=2, end=3), self.const([0])),
                self.const(1)), self.const([0])))
        return self.op("RotaryEmbedding", x, positions, table(cos), table(sin),
                       domain="com.microsoft", interleaved=0, num_heads=heads)

    def attend_grouped(self, qp, kp, vp, kc, vc, mask, scale, h, kvh, d):
        """Few KV heads (GQA/MQA): keys and values stay in the cache's [B, C, kvh*d] layout,
        which costs no transpose or concat of the large tensors. Each query is spread over
        all kvh*d columns with zeros outside its KV head's block, so one GEMM per sequence
        gives every head's scores (kvh times the small attention FLOPs), softmax axis last."""
        g = h // kvh
        own = np.zeros((h, kvh), np.float32)
        for head in range(h):
            own[head, head // g] = 1.0
        own5 = self.const(own.reshape(1, h, 1, kvh, 1), np.float32)
        qt = self.op("Transpose", qp, perm=[0, 2, 1, 3])  # [B, h, Tq, d]
        qbd = self.op("Mul", self.op("Unsqueeze", qt, self.const([3])), own5)
        qbd = self.op("Reshape", qbd, self.const([0, 0, 0, kvh * d]))  # [B, h, Tq, kvh*d]
        flat = self.const([0, 0, kvh * d])

        def rows(x):  # [B, n, kvh, d] -> [B, 1, n, kvh*d], broadcast over the heads
            return self.op("Unsqueeze", self.op("Reshape", x, flat), self.const([1]))

        kp2, vp2 = rows(kp), rows(vp)
        # This step's own keys (few for decode, a chunk for prefill) take per-KV-head GEMMs:
        # no wasted FLOPs where a prefill chunk's Tq x Tq block is the big one.
        q_kv = self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", qp, self.const([0, 0, kvh, g, d])), perm=[0, 2, 3, 1, 4]),
            self.const([0, kvh, -1, d]))  # [B, kvh, g*Tq, d]
        kc_t = self.op("Transpose", kc, perm=[0, 2, 1, 3])  # [B, kvh, Tq, d]
        vc_t = self.op("Transpose", vc, perm=[0, 2, 1, 3])
        heads = self.const([0, h, -1, 0])  # [B, kvh, g*Tq, n] -> [B, h, Tq, n]

        def nt(a, b):
            return self.op("FusedMatMul", a, b, domain="com.microsoft", transA=0, transB=1,
                           alpha=1.0)

        s_cur = self.op("Reshape", nt(q_kv, kc_t), heads)
        scores = self.op("Concat", nt(qbd, kp2), s_cur, axis=-1)  # [B, h, Tq, C+Tq]
        probs = self.op("Softmax", self.op("Add", self.op("Mul", scores, scale), mask), axis=-1)
        n_past = self.op("Shape", kp, start=1, end=2)
        p_past = self.op("Slice", probs, self.const([0]), n_past, self.const([3]))
        p_cur = self.op("Slice", probs, n_past, self.const([2**62]), self.const([3]))
        past = self.op("Reshape", self.op("MatMul", p_past, vp2), self.const([0, 0, 0, kvh, d]))
        # [B, h, Tq, kvh, d]: keep each head's own KV head
        out = self.op("ReduceSum", self.op("Mul", past, own5), self.const([3]), keepdims=0)
        p_cur = self.op("Reshape", p_cur, self.const([0, kvh, -1, 0]))
        cur = self.op("Reshape", self.op("MatMul", p_cur, vc_t), self.const([0, h, -1, d]))
        out = self.op("Add", out, cur)
        return self.op("Transpose", out, perm=[0, 2, 1, 3])  # [B, Tq, h, d]

    def attend_heads(self, qp, kp, vp, kc, vc, mask, scale, h, kvh, d):
        """Many KV heads (MHA): batched per-head GEMMs over [B, kvh, C+Tq, d] keys."""
        g = h // kvh
        q = self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", qp, self.const([0, 0, kvh, g, d])), perm=[0, 2, 3, 1, 4]),
            self.const([0, kvh, -1, d]))  # [B, kvh, g*Tq, d]: a KV head's query heads by row

        def heads(p, c):
            return self.op("Transpose", self.op("Concat", p, c, axis=1), perm=[0, 2, 1, 3])

        keys, values = heads(kp, kc), heads(vp, vc)
        scores = self.op("Mul", self.op("FusedMatMul", q, keys, domain="com.microsoft",
                                        transA=0, transB=1, alpha=1.0), scale)
        tiled = self.step_once(("tiled", mask, g), lambda: self.op(
            "Tile", mask, self.const([1, 1, g, 1])))
        probs = self.op("Softmax", self.op("Add", scores, tiled), axis=-1)
        out = self.op("MatMul", probs, values)  # [B, kvh, g*Tq, d]
        return self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", out, self.const([0, kvh, g, -1, d])), perm=[0, 3, 1, 2, 4]),
            self.const([0, 0, h, d]))  # [B, Tq, h, d]

