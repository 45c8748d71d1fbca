# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""Grouped expert GEMM over float expert weights (hand-written CPU TIR): moe_grouped.py's
gate_up_func / down_func for weights stored (E, N, K) as float32, float16 or bfloat16 bits.

Rules:
- Same interface, sort (moe_grouped.sort_func), task layout and epilogues as moe_grouped.py:
  tasks are output features (gate_up: FEATURES gate features with the up features of the same
  positions; down: FEATURES outputs), each walking the experts in order and skipping those with
  no rows; down owns its output columns for every token and sums the slots in place.
- (E, N, K) keeps K contiguous per feature, so the product is a dot product over K: a register
  block of ROWS rows x 4 features holds 16-lane partial sums over k (`acc[c, r, 0:16] +=
  x[r, k:k+16] * W[n_c, k:k+16]`, no transpose of the weights), summed across lanes at the end;
  the 4 weight rows of a task stay in L1 over all of an expert's rows. A K that is not a
  multiple of 16 adds a scalar tail loop. Rows left over past the last whole block of ROWS go
  in a block of 2 and / or of 1 (never a row past the expert's range).
- float16 / bfloat16 weights widen to float32 in the load (bfloat16: the bits shifted up).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from mlctrio.models.fastmath import silu
from mlctrio.models.moe_grouped_blocks import ROWS
from mlctrio.models.quantization import QuantSpec

LANES = 16  # float32 lanes of a partial sum
FEATURES = 4  # weight rows (features) per register block


def _load(spec: QuantSpec, w: Any, e: Any, n: Any, k: Any) -> Any:
    """W[e, n, k] as float32."""
    if spec.kind == "bf16":
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", w[e, n, k]), T.uint32(16)))
    return w[e, n, k] if spec.weight_dtype == "float32" else T.Cast("float32", w[e, n, k])


def dot_block_macro(spec: QuantSpec, feats: int, rows: int, kin: int) -> Any:
    """block(acc, sums, w, e, feat, src, row): sums[c, r] = sum_k src[row[r], k] * W[e, feat(c), k]
    for `feats` features and `rows` source rows; `feat` a Python function of c."""
    vec, tail = kin // LANES, kin % LANES

    # fmt: off
    @T.macro
    def block(acc, sums, w, e, feat, src, row):
        for c in T.unroll(feats):
            for r in T.unroll(rows):
                for lane in T.vectorized(LANES):
                    acc[c, r, lane] = T.float32(0)
        for ko in T.serial(vec):
            for c in T.unroll(feats):
                for r in T.unroll(rows):
                    for lane in T.vectorized(LANES):
                        acc[c, r, lane] += src[row[r], ko * LANES + lane] * _load(spec, w, e, feat(c), ko * LANES + lane)
        for kt in T.serial(tail):
            for c in T.unroll(feats):
                for r in T.unroll(rows):
                    acc[c, r, 0] += src[row[r], vec * LANES + kt] * _load(spec, w, e, feat(c), vec * LANES + kt)
        for c in T.unroll(feats):
            for r in T.unroll(rows):
                sums[c, r] = T.float32(0)
                for lane in T.serial(LANES):
                    sums[c, r] += acc[c, r, lane]
    # fmt: on
    return block


def _half(inter: int) -> int:
    """Gate features (and as many up features) per gate_up task."""
    return next(f for f in (FEATURES // 2, 1) if inter % f == 0)


def _gate_up_rows(spec: QuantSpec, top_k: int, hidden: int, inter: int, rows: int) -> Any:
    """go(acc, sums, row, x, w, order, weight, act, e, p, r0): the SwiGLU of sorted rows
    [r0, r0 + rows) on gate features [F p, F p + F) and the up features at I + the same."""
    F = _half(inter)
    block = dot_block_macro(spec, 2 * F, rows, hidden)

    # fmt: off
    @T.macro
    def go(acc, sums, row, x, w, order, weight, act, e, p, r0):
        for r in T.unroll(rows):
            row[r] = order[r0 + r] // top_k
        block(acc, sums, weight, e, lambda c: c // F * inter + p * F + c % F, x, row)
        for r in T.unroll(rows):
            for f in T.unroll(F):
                act[r0 + r, p * F + f] = silu(sums[f, r]) * sums[F + f, r] * w[order[r0 + r] // top_k, order[r0 + r] % top_k]
    # fmt: on
    return go


@functools.cache
def gate_up_func(
    spec: QuantSpec, num_experts: int, top_k: int, hidden: int, inter: int
) -> tirx.PrimFunc:
    """(x (n, H), w (n, top_k), indptr, order, weight (E, 2 I, H)) -> act (n * top_k, I), rows
    in sorted order: silu(gate) * up * routing weight."""
    E, K, H, R, F = num_experts, top_k, hidden, ROWS, _half(inter)
    b4, b2, b1 = (_gate_up_rows(spec, K, H, inter, r) for r in (R, 2, 1))

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_gate_up(var_x: T.handle, var_w: T.handle, var_indptr: T.handle, var_order: T.handle,
                            var_weight: T.handle, var_act: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, H), "float32")
        w = T.match_buffer(var_w, (n, K), "float32")
        indptr = T.match_buffer(var_indptr, (E + 1,), "int32")
        order = T.match_buffer(var_order, (n * K,), "int32")
        weight = T.match_buffer(var_weight, (E, 2 * inter, H), spec.weight_dtype)
        act = T.match_buffer(var_act, (n * K, inter), "float32")
        for p in T.parallel(inter // F):
            with T.sblock("gate_up"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((2 * F, R, LANES), "float32", scope="local")
                sums = T.sblock_alloc_buffer((2 * F, R), "float32", scope="local")
                row = T.sblock_alloc_buffer((R,), "int32", scope="local")
                for e in T.serial(E):
                    lo: T.let[T.int32] = indptr[e]
                    m: T.let[T.int32] = indptr[e + 1] - lo
                    for b in T.serial(m // R):
                        b4(acc, sums, row, x, w, order, weight, act, e, p, lo + b * R)
                    if m % R >= 2:
                        b2(acc, sums, row, x, w, order, weight, act, e, p, lo + m - m % R)
                    if m % 2 == 1:
                        b1(acc, sums, row, x, w, order, weight, act, e, p, lo + m - 1)
    # fmt: on
    return moe_grouped_gate_up


def _down_rows(spec: QuantSpec, top_k: int, feats: int, inter: int, rows: int) -> Any:
    """go(acc, sums, row, act, order, weight, out, e, task, r0): out[token, F task:F task + F] +=
    the down projection of sorted rows [r0, r0 + rows)."""
    block = dot_block_macro(spec, feats, rows, inter)

    # fmt: off
    @T.macro
    def go(acc, sums, row, act, order, weight, out, e, task, r0):
        for r in T.unroll(rows):
            row[r] = r0 + r
        block(acc, sums, weight, e, lambda c: task * feats + c, act, row)
        for r in T.unroll(rows):
            for f in T.unroll(feats):
                out[order[r0 + r] // top_k, task * feats + f] += sums[f, r]
    # fmt: on
    return go


@functools.cache
def down_func(
    spec: QuantSpec, num_experts: int, top_k: int, inter: int, hidden: int
) -> tirx.PrimFunc:
    """(act (n * top_k, I) sorted, indptr, order, weight (E, H, I)) -> out (n, H): per token
    the sum over its slots."""
    E, K, H, R = num_experts, top_k, hidden, ROWS
    F = next(f for f in (FEATURES, 2, 1) if hidden % f == 0)
    b4, b2, b1 = (_down_rows(spec, K, F, inter, r) for r in (R, 2, 1))

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_down(var_act: T.handle, var_indptr: T.handle, var_order: T.handle,
                         var_weight: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        act = T.match_buffer(var_act, (n * K, inter), "float32")
        indptr = T.match_buffer(var_indptr, (E + 1,), "int32")
        order = T.match_buffer(var_order, (n * K,), "int32")
        weight = T.match_buffer(var_weight, (E, H, inter), spec.weight_dtype)
        out = T.match_buffer(var_out, (n, H), "float32")
        for task in T.parallel(H // F):
            with T.sblock("down"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((F, R, LANES), "float32", scope="local")
                sums = T.sblock_alloc_buffer((F, R), "float32", scope="local")
                row = T.sblock_alloc_buffer((R,), "int32", scope="local")
                for t, f in T.grid(n, F):
                    out[t, task * F + f] = T.float32(0)
                for e in T.serial(E):
                    lo: T.let[T.int32] = indptr[e]
                    m: T.let[T.int32] = indptr[e + 1] - lo
                    for b in T.serial(m // R):
                        b4(acc, sums, row, act, order, weight, out, e, task, lo + b * R)
                    if m % R >= 2:
                        b2(acc, sums, row, act, order, weight, out, e, task, lo + m - m % R)
                    if m % 2 == 1:
                        b1(acc, sums, row, act, order, weight, out, e, task, lo + m - 1)
    # fmt: on
    return moe_grouped_down
