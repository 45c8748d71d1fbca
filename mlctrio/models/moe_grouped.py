# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""Grouped expert GEMM for mixture-of-experts steps of several tokens (hand-written CPU TIR).

A step of n tokens routes n * top_k (token, slot) rows. Instead of multiplying each row by its
expert's weights (te_moe.expert_matmul_te: an expert shared by m rows is read and dequantised m
times), the rows are sorted by expert and each expert's weights are read once per step, over
all of its rows (MLC-LLM's `moe_matmul.group_gemm`, vLLM's fused_moe):

    sort_func         ids (n, top_k) -> indptr (E + 1,) and order (n * top_k,): the flat
                      (token * top_k + slot) indices sorted by expert, stable; the rows of expert
                      e are order[indptr[e]:indptr[e + 1]]. One serial counting sort,
                      O(n * top_k + E).
    gate_up_func      x (n, H), routing weights (n, top_k), indptr, order, gate_up weights ->
                      act (n * top_k, I) in sorted order: silu(gate) * up * routing weight.
    down_func         act, indptr, order, down weights -> out (n, H), each token's rows summed.

Rules:
- Weights: group formats in the CPU tile16 layout (q_weight / q_scale (E, N / 16, x, 16), as
  te_moe.expert_group_matmul_te reads them) here; float ones ((E, N, K), float32 / float16 /
  bfloat16 bits) in moe_grouped_float.py, which shares `sort_func` and the task layout.
- Tasks (`T.parallel`) are output tiles; each walks the experts in order and skips those with no
  rows, so a step still reads only the experts it routes to. gate_up's task is one tile of 16
  gate features with the 16 up features of the same positions, so the SwiGLU is the epilogue;
  down's is DOWN_TILES tiles of 16 outputs. A task owns its output columns for every token, so
  down sums each token's slots in place (zeroed first), with no race and no scatter buffer.
- Per (task, expert), by the expert's row count m in the step (moe_grouped_blocks.py): from
  DIRECT_BELOW rows on, the weight tiles are dequantised once into a float (K, 16) workspace
  and every ROWS rows take them as outer products, `acc[r, 0:16] += x[r, k] * wt[k, 0:16]`
  (one vector load per k for all rows); below, "direct" blocks read the stored integers and
  scale per group (no workspace: cheaper for few rows, as in batched decode). Rows past the
  last whole block of ROWS go in a block of 2 and / or 1. Never a predicate in the inner loop,
  never a row past the expert's range.
- Activations are float32 (the CPU's); the kernels are `tirx.is_scheduled`, no pass touches them.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from mlctrio.models.fastmath import silu
from mlctrio.models.moe_grouped_blocks import (
    ROWS,
    buffered_block,
    dequant_macro,
    direct_block,
)
from mlctrio.models.quantization import TILE, QuantSpec

DOWN_TILES = 2  # output tiles of 16 per down-projection task (when the width allows)
DIRECT_BELOW = 8  # an expert with fewer rows in a step takes the direct blocks


@functools.cache
def sort_func(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """(ids (n, top_k) int32) -> (indptr (E + 1,) int32, order (n * top_k,) int32): a stable
    counting sort of the flat (token, slot) indices by expert."""
    E, K = num_experts, top_k

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_sort(var_ids: T.handle, var_indptr: T.handle, var_order: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (n, K), "int32")
        indptr = T.match_buffer(var_indptr, (E + 1,), "int32")
        order = T.match_buffer(var_order, (n * K,), "int32")
        with T.sblock("sort"):
            T.reads()
            T.writes()
            cursor = T.sblock_alloc_buffer((E,), "int32")
            for e in T.serial(E + 1):
                indptr[e] = 0
            for t, j in T.grid(n, K):
                indptr[ids[t, j] + 1] += 1
            for e in T.serial(E):
                indptr[e + 1] += indptr[e]
                cursor[e] = indptr[e]
            for t, j in T.grid(n, K):
                order[cursor[ids[t, j]]] = T.Cast("int32", t * K + j)
                cursor[ids[t, j]] += 1
    # fmt: on
    return moe_sort


def _gate_up_rows(
    spec: QuantSpec, top_k: int, hidden: int, inter: int, rows: int, direct: bool
) -> Any:
    """go(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, r0): the SwiGLU of sorted rows
    [r0, r0 + rows) on gate tile p and up tile I / 16 + p, into act[:, 16 p:16 p + 16]."""
    if direct:
        block, stride = direct_block(spec, 2, inter // TILE, rows, hidden), 1
    else:
        block, stride = buffered_block(2, rows, hidden), ROWS // rows

    # fmt: off
    @T.macro
    def go(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, r0):
        for r in T.unroll(rows):
            row[r] = order[r0 + r] // top_k
        block(acc, gd, xs, wt, qw, qs, e, p, x, row)
        for r in T.unroll(rows):
            for lane in T.vectorized(TILE):
                act[r0 + r, p * TILE + lane] = silu(acc[0, r * stride, lane]) * acc[1, r * stride, lane] * w[order[r0 + r] // top_k, order[r0 + r] % top_k]
    # fmt: on
    return go


@functools.cache
def gate_up_func(
    spec: QuantSpec, num_experts: int, top_k: int, hidden: int, inter: int
) -> tirx.PrimFunc:
    """(x (n, H), w (n, top_k), indptr, order, q_weight, q_scale) -> act (n * top_k, I), rows
    in sorted order; gate_up stored tile16, (E, 2 I / 16, x, 16), gate tiles then up tiles."""
    E, K, H, R, D = num_experts, top_k, hidden, ROWS, DIRECT_BELOW
    P, words = inter // TILE, H * spec.bits // 32
    cols = H // spec.group_size * spec.scales_per_group
    dequant = dequant_macro(spec, H)
    b4, b2, b1 = (_gate_up_rows(spec, K, H, inter, r, False) for r in (R, 2, 1))
    d4, d2, d1 = (_gate_up_rows(spec, K, H, inter, r, True) for r in (R, 2, 1))

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_gate_up(var_x: T.handle, var_w: T.handle, var_indptr: T.handle, var_order: T.handle,
                            var_qw: T.handle, var_qs: T.handle, var_act: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, H), "float32")
        w = T.match_buffer(var_w, (n, K), "float32")
        indptr = T.match_buffer(var_indptr, (E + 1,), "int32")
        order = T.match_buffer(var_order, (n * K,), "int32")
        qw = T.match_buffer(var_qw, (E, 2 * P, words, TILE), "uint32")
        qs = T.match_buffer(var_qs, (E, 2 * P, cols, TILE), spec.scale_dtype)
        act = T.match_buffer(var_act, (n * K, inter), "float32")
        for p in T.parallel(P):
            with T.sblock("gate_up"):
                T.reads()
                T.writes()
                wt = T.sblock_alloc_buffer((2, H, TILE), "float32")
                acc = T.sblock_alloc_buffer((2, R, TILE), "float32", scope="local")
                gd = T.sblock_alloc_buffer((2, R, TILE), "float32", scope="local")
                xs = T.sblock_alloc_buffer((R,), "float32", scope="local")
                row = T.sblock_alloc_buffer((R,), "int32", scope="local")
                for e in T.serial(E):
                    lo: T.let[T.int32] = indptr[e]
                    m: T.let[T.int32] = indptr[e + 1] - lo
                    if m >= D:
                        dequant(wt, 0, qw, qs, e, p)
                        dequant(wt, 1, qw, qs, e, P + p)
                        for b in T.serial(m // R):
                            b4(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + b * R)
                        if m % R >= 2:
                            b2(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + m - m % R)
                        if m % 2 == 1:
                            b1(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + m - 1)
                    elif m > 0:
                        for b in T.serial(m // R):
                            d4(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + b * R)
                        if m % R >= 2:
                            d2(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + m - m % R)
                        if m % 2 == 1:
                            d1(acc, gd, xs, wt, row, x, w, order, act, qw, qs, e, p, lo + m - 1)
    # fmt: on
    return moe_grouped_gate_up


def _down_rows(spec: QuantSpec, top_k: int, tiles: int, inter: int, rows: int, direct: bool) -> Any:
    """go(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, r0): out[token, 16 t0:16 (t0 +
    tiles)] += the down projection of sorted rows [r0, r0 + rows)."""
    if direct:
        block, stride = direct_block(spec, tiles, 1, rows, inter), 1
    else:
        block, stride = buffered_block(tiles, rows, inter), ROWS // rows

    # fmt: off
    @T.macro
    def go(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, r0):
        for r in T.unroll(rows):
            row[r] = r0 + r
        block(acc, gd, xs, wt, qw, qs, e, t0, act, row)
        for r in T.unroll(rows):
            for c in T.unroll(tiles):
                for lane in T.vectorized(TILE):
                    out[order[r0 + r] // top_k, (t0 + c) * TILE + lane] += acc[c, r * stride, lane]
    # fmt: on
    return go


def down_tiles(hidden: int) -> int:
    """Output tiles of 16 per down task: DOWN_TILES where they divide the width, else 1."""
    return DOWN_TILES if hidden // TILE % DOWN_TILES == 0 else 1


@functools.cache
def down_func(
    spec: QuantSpec, num_experts: int, top_k: int, inter: int, hidden: int
) -> tirx.PrimFunc:
    """(act (n * top_k, I) sorted, indptr, order, q_weight, q_scale) -> out (n, H): per token the
    sum over its slots; down stored tile16, (E, H / 16, x, 16)."""
    E, K, H, R, D = num_experts, top_k, hidden, ROWS, DIRECT_BELOW
    C = down_tiles(H)
    words, cols = inter * spec.bits // 32, inter // spec.group_size * spec.scales_per_group
    dequant = dequant_macro(spec, inter)
    b4, b2, b1 = (_down_rows(spec, K, C, inter, r, False) for r in (R, 2, 1))
    d4, d2, d1 = (_down_rows(spec, K, C, inter, r, True) for r in (R, 2, 1))

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_down(var_act: T.handle, var_indptr: T.handle, var_order: T.handle,
                         var_qw: T.handle, var_qs: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        act = T.match_buffer(var_act, (n * K, inter), "float32")
        indptr = T.match_buffer(var_indptr, (E + 1,), "int32")
        order = T.match_buffer(var_order, (n * K,), "int32")
        qw = T.match_buffer(var_qw, (E, H // TILE, words, TILE), "uint32")
        qs = T.match_buffer(var_qs, (E, H // TILE, cols, TILE), spec.scale_dtype)
        out = T.match_buffer(var_out, (n, H), "float32")
        for task in T.parallel(H // TILE // C):
            with T.sblock("down"):
                T.reads()
                T.writes()
                wt = T.sblock_alloc_buffer((C, inter, TILE), "float32")
                acc = T.sblock_alloc_buffer((C, R, TILE), "float32", scope="local")
                gd = T.sblock_alloc_buffer((C, R, TILE), "float32", scope="local")
                xs = T.sblock_alloc_buffer((R,), "float32", scope="local")
                row = T.sblock_alloc_buffer((R,), "int32", scope="local")
                t0: T.let[T.int32] = task * C
                for t, c in T.grid(n, C):
                    for lane in T.vectorized(TILE):
                        out[t, (t0 + c) * TILE + lane] = T.float32(0)
                for e in T.serial(E):
                    lo: T.let[T.int32] = indptr[e]
                    m: T.let[T.int32] = indptr[e + 1] - lo
                    if m >= D:
                        for c in T.serial(C):
                            dequant(wt, c, qw, qs, e, t0 + c)
                        for b in T.serial(m // R):
                            b4(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + b * R)
                        if m % R >= 2:
                            b2(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + m - m % R)
                        if m % 2 == 1:
                            b1(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + m - 1)
                    elif m > 0:
                        for b in T.serial(m // R):
                            d4(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + b * R)
                        if m % R >= 2:
                            d2(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + m - m % R)
                        if m % 2 == 1:
                            d1(acc, gd, xs, wt, row, act, order, out, qw, qs, e, t0, lo + m - 1)
    # fmt: on
    return moe_grouped_down
