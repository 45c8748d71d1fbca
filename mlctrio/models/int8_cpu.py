# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""q4 x int8 matmul kernels for x86 CPUs with AVX512-VNNI (hand-written TIR).

The f32 kernels of a q4 weight spend 3 vector ops per 16 weights turning nibbles into floats
("matmul_group" in schedules.py), or dequantise a tile to f32 first: q4 decode was compute-bound
at ~20 GB/s of weights and q4 prefill slower than f32. Like llama.cpp, every step (prefill and
decode; prefill rows are passed as a batch of one-token rows) instead quantises the activations
to int8 per group of 32 inputs
(`q8_quantize`: scale = max|x| / 127, q = round-half-even(x * 127 / max|x|)), and multiply them
with the 4-bit weights by `vpdpbusd` (64 unsigned x signed byte products summed into 16 int32
lanes per instruction):

- the weights are in the tile16 layout (quantization.pack_tile_np): one 16-lane uint32 vector
  holds one word (8 nibbles, inputs 8w..8w+7) of 16 output features; `w & 0x0F0F0F0F` gives the
  bytes of inputs 8w+0,2,4,6 and `(w >> 4) & 0x0F0F0F0F` those of 8w+1,3,5,7;
- `q8_quantize` stores each word's activations as two dwords in the same byte order (even
  inputs, odd inputs), broadcast to all lanes;
- per group g: y += scale[n, g] * d_g * (sum_k nibble * q_k - 7 * sum_k q_k), the second sum
  precomputed per group (stored nibbles are value + 7, so the zero point comes out exactly).

So per 16 x 8 weights: one load, 3 integer ops and 2 `vpdpbusd` per row, against 32 float ops
in the f32 kernel. A tile's weights (K / 2 bytes) stay in L1 while all row blocks reuse them. Results differ from the f32 path by the int8 rounding of the activations
(relative ~1e-3, as llama.cpp's q4_0 x q8_0); models/reference.py emulates it exactly.
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


@functools.cache
def q8_quantize_func(in_features: int) -> tirx.PrimFunc:
    """(x (b, 1, K) f32) -> (xq (b, K/8, 2) int32 byte-packed, xd (b, K/32, 2) f32 [scale, 7*sum q])."""
    K, KW, G = in_features, in_features // WORD, in_features // GROUP

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def q8_quantize(var_x: T.handle, var_xq: T.handle, var_xd: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        x = T.match_buffer(var_x, (b, 1, K), "float32")
        xq = T.match_buffer(var_xq, (b, KW, 2), "int32")
        xd = T.match_buffer(var_xd, (b, G, 2), "float32")
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
                    xd[r, g, 0] = amax[0] / T.float32(127)
                    xd[r, g, 1] = T.float32(0)
                    for k in T.serial(GROUP):
                        xd[r, g, 1] = xd[r, g, 1] + T.Cast("float32", q[k] * 7)
                    for w, h in T.grid(GROUP // WORD, 2):
                        xq[r, g * (GROUP // WORD) + w, h] = T.bitwise_or(
                            T.bitwise_or(T.bitwise_and(q[w * WORD + h], 255), T.shift_left(T.bitwise_and(q[w * WORD + h + 2], 255), 8)),
                            T.bitwise_or(T.shift_left(T.bitwise_and(q[w * WORD + h + 4], 255), 16), T.shift_left(T.bitwise_and(q[w * WORD + h + 6], 255), 24)),
                        )
    # fmt: on
    return q8_quantize


@functools.cache
def q4_q8_matmul_func(
    tiles: int, in_features: int, rows_block: int, scale_dtype: str = "float32"
) -> tirx.PrimFunc:
    """(xq, xd from q8_quantize, q_weight (tiles, K/8, 16) u32, q_scale (tiles, K/32, 16))
    -> y (b, 1, tiles, 16) f32. Tiles of 16 features in parallel; rows in blocks of
    `rows_block` (accumulators R x 16 int32 and f32 in registers; a partial last block reads a
    clamped row and stores nothing)."""
    KW, G, R = in_features // WORD, in_features // GROUP, rows_block
    WPG = GROUP // WORD  # words per group
    lanes = T.ramp(0, 1, 16)

    def vdp(acc: Any, weights: Any, act: Any) -> Any:  # acc + sum of 4 byte products per lane
        return T.call_llvm_pure_intrin(
            "int32x16",
            T.llvm_lookup_intrinsic_id(VDPBUSD),
            acc,
            T.reinterpret("int8x64", weights),
            T.reinterpret("int8x64", T.Broadcast(act, 16)),
        )

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def q4_q8_matmul(var_xq: T.handle, var_xd: T.handle, w: T.Buffer((tiles, KW, 16), "uint32"), sc: T.Buffer((tiles, G, 16), scale_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        xq = T.match_buffer(var_xq, (b, KW, 2), "int32")
        xd = T.match_buffer(var_xd, (b, G, 2), "float32")
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
                            wv = T.reinterpret("int32x16", w[no, g * WPG + wi, lanes])
                            lo = T.bitwise_and(wv, T.Broadcast(T.int32(LOW_NIBBLES), 16))
                            hi = T.bitwise_and(T.shift_right(wv, T.Broadcast(T.int32(4), 16)), T.Broadcast(T.int32(LOW_NIBBLES), 16))
                            for r in T.unroll(R):
                                row = T.min(ro * R + r, b - 1)
                                iacc[r, lanes] = vdp(iacc[r, lanes], lo, xq[row, g * WPG + wi, 0])
                                iacc[r, lanes] = vdp(iacc[r, lanes], hi, xq[row, g * WPG + wi, 1])
                        for r in T.unroll(R):
                            row = T.min(ro * R + r, b - 1)
                            yacc[r, lanes] = yacc[r, lanes] + T.Cast("float32x16", sc[no, g, lanes]) * T.Broadcast(xd[row, g, 0], 16) * (T.Cast("float32x16", iacc[r, lanes]) - T.Broadcast(xd[row, g, 1], 16))
                    for r in T.unroll(R):
                        if ro * R + r < b:
                            y[ro * R + r, 0, no, lanes] = yacc[r, lanes]
    # fmt: on
    return q4_q8_matmul
