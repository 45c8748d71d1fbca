# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""q4 x int8 matmul kernels for x86 CPUs with AVX512-VNNI (hand-written TIR).

The f32 kernels of a q4 weight spend 3 vector ops per 16 weights turning nibbles into floats
("matmul_group" in schedules.py), or dequantise a tile to f32 first: q4 decode was compute-bound
at ~20 GB/s of weights and q4 prefill slower than f32. Like llama.cpp, every step (prefill and
decode; prefill rows are passed as a batch of one-token rows) instead quantises the activations
to int8 per group of 32 inputs
(`q8_quantize`: q = round-half-even(x * (127 / max|x|)), scale d = max|x| / 127, s = d * sum q;
for the GGUF formats (QuantSpec.f16_act_scales) d and s rounded to f16, as llama.cpp's x86
`quantize_row_q8_0` / `quantize_row_q8_1` store them), and multiply them with the 4-bit weights by `vpdpbusd` (64 unsigned x signed byte products summed
into 16 int32 lanes per instruction):

- the weights are in the tile16 layout (quantization.pack_tile_np): one 16-lane uint32 vector
  holds one word (8 nibbles, inputs 8w..8w+7) of 16 output features; `w & 0x0F0F0F0F` gives the
  bytes of inputs 8w+0,2,4,6 and `(w >> 4) & 0x0F0F0F0F` those of 8w+1,3,5,7;
- `q8_quantize` stores each word's activations as two dwords in the same byte order (even
  inputs, odd inputs), broadcast to all lanes;
- per group g: y += scale[n, g] * d_g * (sum_k stored * q_k - zero * sum_k q_k), the second
  sum precomputed per group (stored values are value + zero, so the zero point comes out
  exactly: 7 for mlc-llm's q4, 8 for GGUF Q4_0, 128 for 8-bit weights stored as q + 128);
  formats with a min (GGUF Q4_1) add scale[n, g] * d_g * sum_k stored * q_k + min[n, g] * s_g,
  as llama.cpp's `ggml_vec_dot_q4_1_q8_1` does (the f16 s_g, not d_g * sum q).

8-bit weights (q8_0, q8f*_1) skip the nibble split: quantization.pack_words_np already stores
each 8-input chunk as the two words (even inputs, odd inputs) that meet the two activation dwords,
so per 16 x 8 weights: two loads and 2 `vpdpbusd` per row.

So per 16 x 8 weights: one load, 3 integer ops and 2 `vpdpbusd` per row, against 32 float ops
in the f32 kernel. A tile's weights (K / 2 bytes) stay in L1 while all row blocks reuse them. Results differ from the f32 path by the int8 rounding of the activations
(relative ~1e-3, as llama.cpp's q4_0 x q8_0); models/reference.py emulates it (the rounding
exactly, float summation order not: a last-bit difference can flip a rounding, docs/discussion/0006
§6).
Used only where `target_has_features("avx512vnni")` (llama.py); elsewhere the f32 kernel runs.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

GROUP = 32  # inputs per activation / weight group (q4*_1 group size)
WORD = 8  # nibbles per uint32 word
VDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
LOW_NIBBLES = 0x0F0F0F0F
ROWS_BLOCK = 4  # rows per register block when the row count is symbolic
XD = 3  # per row and group, q8_quantize's floats: d, sum q, s


@functools.cache
def q8_quantize_func(in_features: int, f16_scales: bool = False) -> tirx.PrimFunc:
    """(x (b, 1, K) f32) -> (xq (b, K/8, 2) int32 byte-packed, xd (b, K/32, 3) f32 [d, sum q, s]):
    d = max|x| / 127, s = d * sum q, with `f16_scales` both rounded to f16 (llama.cpp's q8_0 /
    q8_1 blocks)."""
    K, KW, G = in_features, in_features // WORD, in_features // GROUP

    def f16(v: Any) -> Any:
        return T.Cast("float32", T.Cast("float16", v)) if f16_scales else v

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def q8_quantize(var_x: T.handle, var_xq: T.handle, var_xd: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        x = T.match_buffer(var_x, (b, 1, K), "float32")
        xq = T.match_buffer(var_xq, (b, KW, 2), "int32")
        xd = T.match_buffer(var_xd, (b, G, XD), "float32")
        for r in T.parallel(b):
            for g in T.serial(G):
                with T.sblock("quantize"):
                    T.reads()
                    T.writes()
                    q = T.sblock_alloc_buffer((GROUP,), "int32")
                    amax = T.sblock_alloc_buffer((2,), "float32")
                    amax[0] = T.float32(0)
                    for k in T.serial(GROUP):
                        amax[0] = T.max(amax[0], T.abs(x[r, 0, g * GROUP + k]))
                    amax[1] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                    for k in T.serial(GROUP):
                        q[k] = T.Cast("int32", T.nearbyint(x[r, 0, g * GROUP + k] * amax[1]))
                    xd[r, g, 1] = T.float32(0)
                    for k in T.serial(GROUP):
                        xd[r, g, 1] = xd[r, g, 1] + T.Cast("float32", q[k])
                    amax[0] = amax[0] / T.float32(127)
                    xd[r, g, 0] = f16(amax[0])
                    xd[r, g, 2] = f16(amax[0] * xd[r, g, 1])
                    for w, h in T.grid(GROUP // WORD, 2):
                        xq[r, g * (GROUP // WORD) + w, h] = T.bitwise_or(
                            T.bitwise_or(T.bitwise_and(q[w * WORD + h], 255), T.shift_left(T.bitwise_and(q[w * WORD + h + 2], 255), 8)),
                            T.bitwise_or(T.shift_left(T.bitwise_and(q[w * WORD + h + 4], 255), 16), T.shift_left(T.bitwise_and(q[w * WORD + h + 6], 255), 24)),
                        )
    # fmt: on
    return q8_quantize


@functools.cache
def group_q8_matmul_func(
    tiles: int,
    in_features: int,
    rows_block: int,
    scale_dtype: str = "float32",
    bits: int = 4,
    zero: int = 7,
    has_min: bool = False,
) -> tirx.PrimFunc:
    """(xq, xd from q8_quantize, q_weight (tiles, K*bits/32, 16) u32, q_scale (tiles, K/32 *
    (2 if has_min else 1), 16)) -> y (b, 1, tiles, 16) f32. Tiles of 16 features in parallel;
    rows in blocks of `rows_block` (accumulators R x 16 int32 and f32 in registers; a partial
    last block reads a clamped row and stores nothing).

    Per 8 inputs: 4 bits, one word, its low and high nibbles; 8 bits, two words (even inputs,
    odd inputs), each multiplied as it is. Per group: y += sc * d * (isum - zero * qsum), or
    y += sc * d * isum + m * s with a min (sc, m: the weights' scale and min; d, qsum, s: xd)."""
    KW, G, R = in_features * bits // 32, in_features // GROUP, rows_block
    WPG = GROUP // WORD  # 8-input chunks per group
    SPG = 2 if has_min else 1  # q_scale columns per group
    lanes = T.ramp(0, 1, 16)
    mask = T.Broadcast(T.int32(LOW_NIBBLES), 16)
    four = T.Broadcast(T.int32(4), 16)

    def vdp(acc: Any, weights: Any, act: Any) -> Any:  # acc + sum of 4 byte products per lane
        return T.call_llvm_pure_intrin(
            "int32x16",
            T.llvm_lookup_intrinsic_id(VDPBUSD),
            acc,
            T.reinterpret("int8x64", weights),
            T.reinterpret("int8x64", T.Broadcast(act, 16)),
        )

    def even_odd(w: Any, no: Any, chunk: Any) -> tuple[Any, Any]:
        """The weight bytes of inputs 8c + 0, 2, 4, 6 and 8c + 1, 3, 5, 7 of chunk c."""
        if bits == 4:
            wv = T.reinterpret("int32x16", w[no, chunk, lanes])
            return T.bitwise_and(wv, mask), T.bitwise_and(T.shift_right(wv, four), mask)
        return (
            T.reinterpret("int32x16", w[no, chunk * 2, lanes]),
            T.reinterpret("int32x16", w[no, chunk * 2 + 1, lanes]),
        )

    def group_term(sc: Any, no: Any, g: Any, isum: Any, xd: Any, row: Any) -> Any:
        scale = T.Cast("float32x16", sc[no, g * SPG, lanes])
        d = T.Broadcast(xd[row, g, 0], 16)
        if has_min:
            low = T.Cast("float32x16", sc[no, g * SPG + 1, lanes])
            return scale * d * isum + low * T.Broadcast(xd[row, g, 2], 16)
        zq = T.Broadcast(xd[row, g, 1] * T.float32(zero), 16)
        return scale * d * (isum - zq)

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def group_q8_matmul(var_xq: T.handle, var_xd: T.handle, w: T.Buffer((tiles, KW, 16), "uint32"), sc: T.Buffer((tiles, G * SPG, 16), scale_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        xq = T.match_buffer(var_xq, (b, in_features // WORD, 2), "int32")
        xd = T.match_buffer(var_xd, (b, G, XD), "float32")
        y = T.match_buffer(var_y, (b, 1, tiles, 16), "float32")
        for no in T.parallel(tiles):
            for ro in T.serial((b + R - 1) // R):
                with T.sblock("tile"):
                    T.reads()
                    T.writes()
                    yacc = T.sblock_alloc_buffer((R, 16), "float32", scope="local")
                    iacc = T.sblock_alloc_buffer((R, 16), "int32", scope="local")
                    for r in T.unroll(R):
                        yacc[r, lanes] = T.Broadcast(T.float32(0), 16)
                    for g in T.serial(G):
                        for r in T.unroll(R):
                            iacc[r, lanes] = T.Broadcast(T.int32(0), 16)
                        for wi in T.unroll(WPG):
                            lo, hi = T.meta_var(even_odd(w, no, g * WPG + wi))
                            for r in T.unroll(R):
                                row = T.min(ro * R + r, b - 1)
                                iacc[r, lanes] = vdp(iacc[r, lanes], lo, xq[row, g * WPG + wi, 0])
                                iacc[r, lanes] = vdp(iacc[r, lanes], hi, xq[row, g * WPG + wi, 1])
                        for r in T.unroll(R):
                            row = T.min(ro * R + r, b - 1)
                            yacc[r, lanes] = yacc[r, lanes] + group_term(sc, no, g, T.Cast("float32x16", iacc[r, lanes]), xd, row)
                    for r in T.unroll(R):
                        if ro * R + r < b:
                            y[ro * R + r, 0, no, lanes] = yacc[r, lanes]
    # fmt: on
    return group_q8_matmul
