# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""Parallel, vectorised CPU prefill attention kernels: the step's new tokens among themselves
(ragged) and against the cached prefix (paged). attention_cpu.py has the design notes shared with
the decode kernel (task layout, online softmax in base 2, exp2 polynomial, sliding windows by the
sign of sm_scale) and plugs these into the KV cache.

Prefill is compute bound: K is first transposed, once per call, into a workspace of (head_dim x
BLOCK) tiles (RoPE applied there if inline); then a tile of QTILE query tokens x group heads gets
its scores as outer products `S[r, 0:16] += q[r, d] * Kt[d, 0:16]` (one vector load of K per d
for all rows, independent accumulators), and `O[r, :] += P[r, j] * V[j, :]` vectorised over
head_dim. A row's visible columns are [lo, lim): lim from the causal triangle, lo from the
sliding window (0 for full layers); blocks wholly before the tile's first lo are skipped.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache as _kvc
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _rope
from tvm.script import tirx as T

from mlctrio.models.fastmath import LOG2E
from mlctrio.models.fastmath import exp2_nonpositive as _exp2
from mlctrio.models.rope_inline_cpu import linear_rope, trig_macros

BLOCK = 16  # kv positions per softmax block; equals the page size the stock kernels assume
STOCK = {
    "decode": _kvc._attention_decode_cpu,
    "prefill": _kvc._attention_prefill_cpu,
    "ragged": _kvc._attention_prefill_ragged_cpu,
}


def layout(length_info: Any, row: int, b: Any, slid: bool) -> Any:
    """Row `row` of a sequence's length info: 0 the last page's length, 1 the slid layout's first
    window column, 2 its sink length (both 0 in a cache without sliding windows)."""
    if slid:
        return length_info[row, b]
    return length_info[b] if row == 0 else 0


def column_position(col: Any, off: Any, snk: Any) -> Any:
    """Position (from the block's k_rope_pos_offset) of the key in page-list column `col`: the
    sinks [0, snk) keep theirs, the window from column `off` on follows them."""
    return T.if_then_else(col < snk, col, col - off + snk)


def _rotate_macros(
    P: int, D: int, dtype: str, rope_scaling: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """(setup, rotate_paged, rotate_ragged): inline RoPE of a block of keys into the transposed
    tile kt[d, j] (zeros past n), by angle addition where the frequencies allow it
    (rope_inline_cpu.py), else by `_rope` per element."""
    H = D // 2
    setup, page_trig = trig_macros(P, D, rope_scaling)
    fast = linear_rope(rope_scaling)

    # fmt: off
    @T.macro
    def rotate_paged(kt, pages, page, hk, n, kpos, kpo, col0, off, snk, gf, cstep, sstep, cs, sn, rope_theta, rope_scale):
        if fast:
            page_trig(cs, sn, gf, cstep, sstep, kpos, kpo, col0, off, snk, rope_scale)
            for j, d in T.grid(P, H):
                kt[d, j] = T.if_then_else(j < n, T.Cast("float32", pages[page, 0, hk, j, d]) * cs[j, d] - T.Cast("float32", pages[page, 0, hk, j, d + H]) * sn[j, d], T.float32(0))
                kt[d + H, j] = T.if_then_else(j < n, T.Cast("float32", pages[page, 0, hk, j, d + H]) * cs[j, d] + T.Cast("float32", pages[page, 0, hk, j, d]) * sn[j, d], T.float32(0))
        else:
            for j, dd in T.grid(P, D):
                kpos[0] = kpo + column_position(col0 + j, off, snk)  # see the ragged kernel
                kt[dd, j] = T.if_then_else(j < n, _rope(pages, kpos[0], D, rope_theta, rope_scale, (page, 0, hk, j, dd), dtype, rope_scaling), T.Cast(dtype, 0))

    @T.macro
    def rotate_ragged(kt, k, row0, hk, n, kpos, kpo, col0, gf, cstep, sstep, cs, sn, rope_theta, rope_scale):
        if fast:
            page_trig(cs, sn, gf, cstep, sstep, kpos, kpo, col0, 0, 0, rope_scale)
            for j, d in T.grid(P, H):
                kt[d, j] = T.if_then_else(j < n, T.Cast("float32", k[row0 + T.min(j, n - 1), hk, d]) * cs[j, d] - T.Cast("float32", k[row0 + T.min(j, n - 1), hk, d + H]) * sn[j, d], T.float32(0))
                kt[d + H, j] = T.if_then_else(j < n, T.Cast("float32", k[row0 + T.min(j, n - 1), hk, d + H]) * cs[j, d] + T.Cast("float32", k[row0 + T.min(j, n - 1), hk, d]) * sn[j, d], T.float32(0))
        else:
            for j, d in T.grid(P, D):
                # RoPE position through a buffer: a loop-variable position inside _rope's
                # float Let fails LLVM codegen in T.parallel.
                kpos[0] = kpo + col0 + T.min(j, n - 1)
                kt[d, j] = T.if_then_else(j < n, _rope(k, kpos[0], D, rope_theta, rope_scale, (row0 + T.min(j, n - 1), hk, d), dtype, rope_scaling), T.Cast(dtype, 0))
    # fmt: on
    return setup, rotate_paged, rotate_ragged


def _qtile(group: int) -> int:
    """Query tokens per prefill task: about 12 rows (tokens x heads) of score accumulators."""
    return max(1, 12 // group)


def _prefill_macros(
    G: int, D: int, QT: int, qkv_dtype: str, rope_scaling: dict[str, Any], window: int
):
    """TVMScript macros shared by the ragged and paged prefill kernels (R = QT * G rows).
    Columns are the kv page list's (attention_cpu.py's slid layout: `off`, `snk`)."""
    R, BK, W = QT * G, BLOCK, max(window, 1)

    # fmt: off
    @T.macro
    def load_q(q, q_rope_position, q_loc, lim, lo, m_loc, l_loc, o_loc, tok0, n_tok, q_idx0, hk,
               kv_len, qo_len, causal, rotary_mode, rope_scale, rope_theta, sm_scale, k_pos0, off, snk):
        for t, g, d in T.grid(QT, G, D):
            q_loc[t * G + g, d] = T.if_then_else(
                t < n_tok,
                T.if_then_else(
                    rotary_mode == 1,
                    _rope(q, q_rope_position[tok0 + t], D, rope_theta, rope_scale, (tok0 + t, hk * G + g, d), qkv_dtype, rope_scaling),
                    q[tok0 + t, hk * G + g, d],
                ), T.Cast(qkv_dtype, 0),
            ) * T.abs(sm_scale) * T.float32(LOG2E)
            o_loc[t * G + g, d] = T.float32(0)
        for t, g in T.grid(QT, G):
            # kv columns visible to this row: causal keeps the last qo_len columns as a triangle
            lim[t * G + g] = T.if_then_else(causal > 0, T.min(kv_len - qo_len + q_idx0 + t + 1, kv_len), kv_len)
            # and a sliding layer (sm_scale < 0, see the module docstring) only those within the window
            lo[t * G + g] = T.max(T.if_then_else(sm_scale < 0, q_rope_position[tok0 + T.min(t, n_tok - 1)] - W + 1 - k_pos0, 0) - snk, 0) + off
            m_loc[t * G + g] = T.float32(-5e4)
            l_loc[t * G + g] = T.float32(1)

    @T.macro
    def block(kt, q_loc, s_loc, lim, lo, m_loc, l_loc, o_loc, m_new, alpha, col0, sv):
        # Scores as outer products: one vector load of K^T per d for all R rows.
        for r, j in T.grid(R, BK):
            s_loc[r, j] = T.float32(0)
        for d in T.serial(D):
            for r in T.unroll(R):
                for j in T.vectorized(BK):
                    s_loc[r, j] += q_loc[r, d] * kt[d, j]
        for r in T.serial(R):
            m_new[r] = m_loc[r]
            for j in T.serial(BK):
                # visible: before the causal limit, and in the window or among the sinks [0, sv)
                s_loc[r, j] = T.if_then_else(tirx.all(col0 + j < lim[r], tirx.any(col0 + j >= lo[r], col0 + j < sv)), s_loc[r, j], T.float32(-1e30))
                m_new[r] = T.max(m_new[r], s_loc[r, j])
            for j in T.vectorized(BK):
                s_loc[r, j] = _exp2(s_loc[r, j] - m_new[r])
            alpha[r] = _exp2(m_loc[r] - m_new[r])
            m_loc[r] = m_new[r]
            l_loc[r] = l_loc[r] * alpha[r]
            for j in T.serial(BK):
                l_loc[r] += s_loc[r, j]
            for d in T.vectorized(D):
                o_loc[r, d] = o_loc[r, d] * alpha[r]
        # The caller then adds P @ V over the n columns that exist: V past the end may be
        # uninitialised memory (0 * NaN = NaN).

    @T.macro
    def store(output, lse, o_loc, m_loc, l_loc, tok0, n_tok, hk):
        for t, g in T.grid(QT, G):
            if t < n_tok:
                for d in T.vectorized(D):
                    output[tok0 + t, hk * G + g, d] = T.Cast(qkv_dtype, o_loc[t * G + g, d] / l_loc[t * G + g])
                lse[tok0 + t, hk * G + g] = m_loc[t * G + g] + T.log2(l_loc[t * G + g])
    # fmt: on
    return load_q, block, store


def attention_prefill_ragged_cpu(
    h_kv: int,
    h_q: int,
    d_qk: int,
    d_v: int,
    dtype: str,
    rope_scaling: dict[str, Any],
    window: int = 0,
    sink: int = 0,
) -> tirx.PrimFunc:
    """Drop-in for `_attention_prefill_ragged_cpu` (self-attention over the new tokens)."""
    if d_qk != d_v:
        return STOCK["ragged"](h_kv, h_q, d_qk, d_v, dtype, rope_scaling)
    G, D, BK, S = h_q // h_kv, d_qk, BLOCK, sink
    QT = _qtile(G)
    R = QT * G
    load_q, block, store = _prefill_macros(G, D, QT, dtype, rope_scaling, window)
    setup, _, rotate_ragged = _rotate_macros(BLOCK, D, dtype, rope_scaling)

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
        var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size, qo_total, kv_total = T.int32(), T.int32(), T.int32()
        o1, o2, o3, o4 = T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_total, h_q, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o1)
        k = T.match_buffer(var_k, (kv_total, h_kv, D), dtype)
        v = T.match_buffer(var_v, (kv_total, h_kv, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=o2)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_total,), "int32", elem_offset=o3)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o4)
        output = T.match_buffer(var_output, (qo_total, h_q, D), dtype)
        lse = T.match_buffer(var_lse, (qo_total, h_q), "float32")

        # Task = (kv head, tile of QT consecutive tokens); a tile crossing sequence boundaries
        # is processed segment by segment. kv head outermost: the parallel loop is split into
        # contiguous chunks, so each thread gets whole heads and equal causal work.
        n_tiles: T.let[T.int32] = T.ceildiv(qo_total, QT)
        for task in T.parallel(h_kv * n_tiles):
            with T.sblock("attn"):
                T.reads()  # hand-written: no region inference over the let-bound lengths
                T.writes()
                q_loc = T.sblock_alloc_buffer((R, D), "float32")
                o_loc = T.sblock_alloc_buffer((R, D), "float32")
                kt = T.sblock_alloc_buffer((D, BK), "float32")
                s_loc = T.sblock_alloc_buffer((R, BK), "float32")
                lim = T.sblock_alloc_buffer((R,), "int32")
                lo = T.sblock_alloc_buffer((R,), "int32")
                m_loc = T.sblock_alloc_buffer((R,), "float32")
                l_loc = T.sblock_alloc_buffer((R,), "float32")
                m_new = T.sblock_alloc_buffer((R,), "float32")
                alpha = T.sblock_alloc_buffer((R,), "float32")
                kpos = T.sblock_alloc_buffer((1,), "int32")
                gf = T.sblock_alloc_buffer((D // 2,), "float32")  # inline RoPE (rope_inline_cpu.py)
                cstep = T.sblock_alloc_buffer((D // 2,), "float32")
                sstep = T.sblock_alloc_buffer((D // 2,), "float32")
                cs = T.sblock_alloc_buffer((BLOCK, D // 2), "float32")
                sn = T.sblock_alloc_buffer((BLOCK, D // 2), "float32")
                hk: T.let[T.int32] = task // n_tiles
                t0: T.let[T.int32] = task % n_tiles * QT
                if rotary_mode == 1:
                    setup(gf, cstep, sstep, rope_theta, rope_scale)
                for b in T.serial(batch_size):
                    seg0: T.let[T.int32] = T.max(t0, q_indptr[b])
                    seg1: T.let[T.int32] = T.min(t0 + QT, q_indptr[b + 1])
                    if seg0 < seg1:
                        kv0: T.let[T.int32] = kv_indptr[b]
                        kv_len: T.let[T.int32] = kv_indptr[b + 1] - kv0
                        qo_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                        q_idx0: T.let[T.int32] = seg0 - q_indptr[b]
                        load_q(q, q_rope_position, q_loc, lim, lo, m_loc, l_loc, o_loc, seg0, seg1 - seg0, q_idx0, hk,
                               kv_len, qo_len, causal, rotary_mode, rope_scale, rope_theta, sm_scale, k_rope_pos_offset[b], 0, 0)
                        n_cols: T.let[T.int32] = T.if_then_else(causal > 0, T.min(kv_len - qo_len + q_idx0 + (seg1 - seg0), kv_len), kv_len)
                        sv: T.let[T.int32] = T.if_then_else(sm_scale < 0, S - k_rope_pos_offset[b], 0)
                        for blk in T.serial(T.if_then_else(sv > 0, 0, T.max(lo[0], 0) // BK), T.ceildiv(n_cols, BK)):
                            n: T.let[T.int32] = T.min(BK, kv_len - blk * BK)
                            if rotary_mode == 1:
                                rotate_ragged(kt, k, kv0 + blk * BK, hk, n, kpos, k_rope_pos_offset[b], blk * BK, gf, cstep, sstep, cs, sn, rope_theta, rope_scale)
                            else:
                                for j, d in T.grid(BK, D):
                                    kt[d, j] = T.if_then_else(j < n, k[kv0 + blk * BK + T.min(j, n - 1), hk, d], T.Cast(dtype, 0))
                            block(kt, q_loc, s_loc, lim, lo, m_loc, l_loc, o_loc, m_new, alpha, blk * BK, sv)
                            for r, j in T.grid(R, n):
                                for d in T.vectorized(D):
                                    o_loc[r, d] += s_loc[r, j] * T.Cast("float32", v[kv0 + blk * BK + j, hk, d])
                        store(output, lse, o_loc, m_loc, l_loc, seg0, seg1 - seg0, hk)
    # fmt: on
    return batch_prefill_ragged_kv


def attention_prefill_cpu(
    h_kv: int,
    h_q: int,
    d: int,
    dtype: str,
    sliding_window: bool,
    rope_scaling: dict[str, Any],
    page_size: int = 16,
    sliding_window_size: int = 1024,
    window: int = 0,
    sink: int = 0,
) -> tirx.PrimFunc:
    """Drop-in for `_attention_prefill_cpu` (new tokens against the cached prefix in pages);
    with `sliding_window`, the cache's slid layout (length_info (3, B))."""
    if page_size != BLOCK:
        return STOCK["prefill"](
            h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size, sliding_window_size
        )
    G, D, P, S, SW = h_q // h_kv, d, BLOCK, sink, sliding_window
    QT = _qtile(G)
    R = QT * G
    load_q, block, store = _prefill_macros(G, D, QT, dtype, rope_scaling, window)
    setup, rotate_paged, _ = _rotate_macros(BLOCK, D, dtype, rope_scaling)
    SYM = "batch_prefill_paged_kv_cpu" + ("_slid" if SW else "")

    # fmt: off
    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": SYM})
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        o1, o2, o3, o4, o5, o6 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o1)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=o2)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o3)
        length_info = _declare_length_info(var_length_info, batch_size, SW, o4)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o5)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=o6)
        output = T.match_buffer(var_output, (total_len, h_q, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        # Same task layout as the ragged kernel; a kv block is one page.
        n_tiles: T.let[T.int32] = T.ceildiv(total_len, QT)
        for task in T.parallel(h_kv * n_tiles):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                q_loc = T.sblock_alloc_buffer((R, D), "float32")
                o_loc = T.sblock_alloc_buffer((R, D), "float32")
                kt = T.sblock_alloc_buffer((D, P), "float32")
                s_loc = T.sblock_alloc_buffer((R, P), "float32")
                lim = T.sblock_alloc_buffer((R,), "int32")
                lo = T.sblock_alloc_buffer((R,), "int32")
                m_loc = T.sblock_alloc_buffer((R,), "float32")
                l_loc = T.sblock_alloc_buffer((R,), "float32")
                m_new = T.sblock_alloc_buffer((R,), "float32")
                alpha = T.sblock_alloc_buffer((R,), "float32")
                kpos = T.sblock_alloc_buffer((1,), "int32")
                gf = T.sblock_alloc_buffer((D // 2,), "float32")  # inline RoPE (rope_inline_cpu.py)
                cstep = T.sblock_alloc_buffer((D // 2,), "float32")
                sstep = T.sblock_alloc_buffer((D // 2,), "float32")
                cs = T.sblock_alloc_buffer((BLOCK, D // 2), "float32")
                sn = T.sblock_alloc_buffer((BLOCK, D // 2), "float32")
                hk: T.let[T.int32] = task // n_tiles
                t0: T.let[T.int32] = task % n_tiles * QT
                if rotary_mode == 1:
                    setup(gf, cstep, sstep, rope_theta, rope_scale)
                for b in T.serial(batch_size):
                    seg0: T.let[T.int32] = T.max(t0, q_indptr[b])
                    seg1: T.let[T.int32] = T.min(t0 + QT, q_indptr[b + 1])
                    if seg0 < seg1:
                        p0: T.let[T.int32] = page_indptr[b]
                        n_pages: T.let[T.int32] = page_indptr[b + 1] - p0
                        kv_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * P + layout(length_info, 0, b, SW), 0)
                        off: T.let[T.int32] = layout(length_info, 1, b, SW)
                        snk: T.let[T.int32] = layout(length_info, 2, b, SW)
                        kpo: T.let[T.int32] = k_rope_pos_offset[b]
                        qo_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                        q_idx0: T.let[T.int32] = seg0 - q_indptr[b]
                        load_q(q, q_rope_position, q_loc, lim, lo, m_loc, l_loc, o_loc, seg0, seg1 - seg0, q_idx0, hk,
                               kv_len, qo_len, causal, rotary_mode, rope_scale, rope_theta, sm_scale, kpo, off, snk)
                        n_cols: T.let[T.int32] = T.if_then_else(causal > 0, T.min(kv_len - qo_len + q_idx0 + (seg1 - seg0), kv_len), kv_len)
                        sv: T.let[T.int32] = T.if_then_else(sm_scale < 0, S - kpo, snk)
                        for blk in T.serial(T.if_then_else(sv > 0, 0, T.max(lo[0], 0) // P), T.ceildiv(n_cols, P)):
                            page: T.let[T.int32] = page_values[p0 + blk]
                            n: T.let[T.int32] = T.min(P, kv_len - blk * P)
                            if rotary_mode == 1:
                                rotate_paged(kt, pages, page, hk, n, kpos, kpo, blk * P, off, snk, gf, cstep, sstep, cs, sn, rope_theta, rope_scale)
                            else:
                                for j, dd in T.grid(P, D):
                                    kt[dd, j] = T.if_then_else(j < n, pages[page, 0, hk, j, dd], T.Cast(dtype, 0))
                            block(kt, q_loc, s_loc, lim, lo, m_loc, l_loc, o_loc, m_new, alpha, blk * P, sv)
                            for j in T.serial(n):
                                # (slots the slid layout released may hold anything)
                                if tirx.any(blk * P + j < snk, blk * P + j >= off):
                                    for r in T.serial(R):
                                        for dd in T.vectorized(D):
                                            o_loc[r, dd] += s_loc[r, j] * T.Cast("float32", pages[page, 1, hk, j, dd])
                        store(output, lse, o_loc, m_loc, l_loc, seg0, seg1 - seg0, hk)
    # fmt: on
    return batch_prefill_paged_kv_cpu
