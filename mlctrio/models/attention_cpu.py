# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""Parallel, vectorised CPU attention kernels for TVM's paged KV cache (llvm target).

TVM 0.27's `_attention_{decode,prefill,prefill_ragged}_cpu` are serial scalar loops marked
`tirx.is_scheduled`, so no pass parallelises them (at 1,024 tokens of context they were ~2/3 of
prefill time). The kernels here (decode; prefill in attention_prefill_cpu.py) keep their exact
signatures and semantics (outputs, base-2 LSE, the -5e4 "empty" state, causal masks, inline RoPE
when `rotary_mode == 1`) and are plugged into the runtime by `CPUPagedKVCache`, which is a `TIRPagedKVCache` built with these kernel factories
(and with rope_cpu.py's split + RoPE kernel).

Shared design (why):
- Parallel over (kv head, query tokens / sequence): every task owns a KV head, so the K/V rows it
  loads serve all `group = h_q // h_kv` query heads of that head (GQA sharing).
- Online softmax per block of `BLOCK` kv positions (= one page): one rescale of the output per block,
  not per position. Scores are kept in base 2 (q is pre-scaled by sm_scale * log2(e)) as in TVM.
- exp2 is a degree-5 polynomial on the fractional part plus exponent bits (rel. error 1e-7): LLVM
  would otherwise call libm's scalar exp2f for each of the ~n^2/2 scores of a prefill.
- Decode (one query per sequence, memory bound): each task streams its sequence's pages once and
  takes head_dim-innermost dot products straight from the page (LLVM vectorises them with the
  fast-math reassoc flag), so K is never copied.
- Prefill (compute bound): K is first transposed, once per call, into a workspace of (head_dim x
  BLOCK) tiles (RoPE applied there if inline); then a tile of QTILE query tokens x group heads gets
  its scores as outer products `S[r, 0:16] += q[r, d] * Kt[d, 0:16]` (one vector load of K per d
  for all rows, independent accumulators), and `O[r, :] += P[r, j] * V[j, :]` vectorised over
  head_dim.
Sliding-window layers (Gemma 3's local layers, Mistral): the same kernels, told apart by the sign
of `sm_scale` (the only argument the cache passes per layer; a sliding layer passes -sm_scale) and
given the window at build time (`CPUPagedKVCache(window=W)`). A key at absolute position kp is
visible to the query at qp iff kp > qp - W (W positions counting the query's own, as
transformers' mask), positions from `k_rope_pos_offset + column` and `q_rope_position`, which
the cache fills for every block of every sequence; blocks wholly before the window are skipped.
TVM's own "mha_sliding" layer kind is not used: its page view reports a wrong first-key position
for a block shorter than the window that is not a sequence's first (a forked prefix), and its
self-attention over the step's new tokens has no window at all.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache as _kvc
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _rope
from tvm.script import tirx as T

from mlctrio.models.attention_prefill_cpu import (
    BLOCK,
    STOCK,
    attention_prefill_cpu,
    attention_prefill_ragged_cpu,
    column_position,
    layout,
)
from mlctrio.models.fastmath import LOG2E
from mlctrio.models.fastmath import exp2_nonpositive as _exp2
from mlctrio.models.rope_cpu import rope_with_position_map_cpu
from mlctrio.models.rope_inline_cpu import linear_rope, trig_macros

_STOCK = STOCK
_SWAP_LOCK = threading.Lock()


def attention_decode_cpu(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    qkv_dtype: str,
    sliding_window: bool,
    rope_scaling: dict[str, Any],
    page_size: int = 16,
    window: int = 0,
    sink: int = 0,
) -> tirx.PrimFunc:
    """Drop-in for `_attention_decode_cpu`: parallel over (sequence, kv head). With
    `sliding_window` (the cache's slid-page layout, module docstring) length_info is (3, B)."""
    if page_size != BLOCK:
        return _STOCK["decode"](
            num_kv_heads, num_qo_heads, head_dim, qkv_dtype, sliding_window, rope_scaling, page_size
        )
    H_kv, H_q, D, G, P = num_kv_heads, num_qo_heads, head_dim, num_qo_heads // num_kv_heads, BLOCK
    W, S, SW, H = max(window, 1), sink, sliding_window, head_dim // 2
    SYM = "batch_decode_paged_kv_cpu" + ("_slid" if SW else "")
    setup, page_trig = trig_macros(P, D, rope_scaling)

    # fmt: off
    @T.macro
    def rotate_fast(k_rot, pages, page, hk, n, kpos, kpo, col0, off, snk, gf, cstep, sstep, cs, sn, rope_theta, rope_scale):
        page_trig(cs, sn, gf, cstep, sstep, kpos, kpo, col0, off, snk, rope_scale)
        for j, d in T.grid(n, H):
            k_rot[j, d] = T.Cast("float32", pages[page, 0, hk, j, d]) * cs[j, d] - T.Cast("float32", pages[page, 0, hk, j, d + H]) * sn[j, d]
            k_rot[j, d + H] = T.Cast("float32", pages[page, 0, hk, j, d + H]) * cs[j, d] + T.Cast("float32", pages[page, 0, hk, j, d]) * sn[j, d]

    @T.macro
    def rotate_exact(k_rot, pages, page, hk, n, kpos, kpo, col0, off, snk, gf, cstep, sstep, cs, sn, rope_theta, rope_scale):
        for j, d in T.grid(n, D):
            kpos[0] = kpo + column_position(col0 + j, off, snk)  # see the ragged prefill kernel
            k_rot[j, d] = _rope(pages, kpos[0], D, rope_theta, rope_scale, (page, 0, hk, j, d), qkv_dtype, rope_scaling)

    rotate = rotate_fast if linear_rope(rope_scaling) else rotate_exact

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": SYM})
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        o1, o2, o3, o4, o5 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(Q_handle, (B, H_q, D), qkv_dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, P, D), qkv_dtype)
        page_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=o1)
        page_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=o2)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=o3)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=o4)
        output = T.match_buffer(output_handle, (B, H_q, D), qkv_dtype)
        lse = T.match_buffer(lse_handle, (B, H_q), "float32")
        length_info = _declare_length_info(var_length_info, B, SW, o5)

        for task in T.parallel(B * H_kv):
            with T.sblock("attn"):
                T.reads()  # hand-written: no region inference over the let-bound lengths
                T.writes()
                q_loc = T.sblock_alloc_buffer((G, D), "float32")
                o_loc = T.sblock_alloc_buffer((G, D), "float32")
                k_rot = T.sblock_alloc_buffer((P, D), "float32")
                s_loc = T.sblock_alloc_buffer((G, P), "float32")
                m_loc = T.sblock_alloc_buffer((G,), "float32")
                l_loc = T.sblock_alloc_buffer((G,), "float32")
                alpha = T.sblock_alloc_buffer((G,), "float32")
                m_new = T.sblock_alloc_buffer((G,), "float32")
                kpos = T.sblock_alloc_buffer((1,), "int32")
                gf = T.sblock_alloc_buffer((H,), "float32")  # inline RoPE: rope_inline_cpu.py
                cstep = T.sblock_alloc_buffer((H,), "float32")
                sstep = T.sblock_alloc_buffer((H,), "float32")
                cs = T.sblock_alloc_buffer((P, H), "float32")
                sn = T.sblock_alloc_buffer((P, H), "float32")
                b: T.let[T.int32] = task // H_kv
                hk: T.let[T.int32] = task % H_kv
                p_begin: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - p_begin
                # kv columns of the page list; slid layout: sinks [0, snk), dead [snk, off)
                kv_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * P + layout(length_info, 0, b, SW), 0)
                off: T.let[T.int32] = layout(length_info, 1, b, SW)
                snk: T.let[T.int32] = layout(length_info, 2, b, SW)
                kpo: T.let[T.int32] = k_rope_pos_offset[b]
                # first visible column: a sliding layer (sm_scale < 0) sees the last W positions
                lo: T.let[T.int32] = T.max(T.if_then_else(sm_scale < 0, q_rope_position[b] - W + 1 - kpo, 0) - snk, 0) + off
                # columns [0, sv) stay visible: attention sinks
                sv: T.let[T.int32] = T.if_then_else(sm_scale < 0, S - kpo, snk)
                for g, d in T.grid(G, D):
                    q_loc[g, d] = T.if_then_else(
                        rotary_mode == 1,
                        _rope(Q, q_rope_position[b], D, rope_theta, rope_scale, (b, hk * G + g, d), qkv_dtype, rope_scaling),
                        Q[b, hk * G + g, d],
                    ) * T.abs(sm_scale) * T.float32(LOG2E)
                    o_loc[g, d] = T.float32(0)
                for g in T.serial(G):
                    m_loc[g] = T.float32(-5e4)
                    l_loc[g] = T.float32(1)
                if rotary_mode == 1:
                    setup(gf, cstep, sstep, rope_theta, rope_scale)
                for pi in T.serial(T.if_then_else(sv > 0, 0, lo // P), n_pages):
                    page: T.let[T.int32] = page_values[p_begin + pi]
                    n: T.let[T.int32] = T.min(P, kv_len - pi * P)
                    if rotary_mode == 1:
                        rotate(k_rot, pages, page, hk, n, kpos, kpo, pi * P, off, snk, gf, cstep, sstep, cs, sn, rope_theta, rope_scale)
                        for g, j in T.grid(G, n):
                            s_loc[g, j] = T.float32(0)
                            for d in T.serial(D):
                                s_loc[g, j] += q_loc[g, d] * k_rot[j, d]
                    else:
                        for j, g in T.grid(n, G):
                            s_loc[g, j] = T.float32(0)
                            for d in T.serial(D):
                                s_loc[g, j] += q_loc[g, d] * T.Cast("float32", pages[page, 0, hk, j, d])
                    for g, j in T.grid(G, n):
                        s_loc[g, j] = T.if_then_else(tirx.any(pi * P + j < sv, pi * P + j >= lo), s_loc[g, j], T.float32(-1e30))
                    for g in T.serial(G):
                        m_new[g] = m_loc[g]
                        for j in T.serial(n):
                            m_new[g] = T.max(m_new[g], s_loc[g, j])
                        for j in T.serial(n):
                            s_loc[g, j] = _exp2(s_loc[g, j] - m_new[g])
                        alpha[g] = _exp2(m_loc[g] - m_new[g])
                        m_loc[g] = m_new[g]
                        l_loc[g] = l_loc[g] * alpha[g]
                        for j in T.serial(n):
                            l_loc[g] += s_loc[g, j]
                        for d in T.vectorized(D):
                            o_loc[g, d] = o_loc[g, d] * alpha[g]
                    for j in T.serial(n):
                        # (slots the slid layout released may hold anything: 0 * NaN = NaN)
                        if tirx.any(pi * P + j < snk, pi * P + j >= off):
                            for g in T.serial(G):
                                for d in T.vectorized(D):
                                    o_loc[g, d] += s_loc[g, j] * T.Cast("float32", pages[page, 1, hk, j, d])
                for g in T.serial(G):
                    for d in T.vectorized(D):
                        output[b, hk * G + g, d] = T.Cast(qkv_dtype, o_loc[g, d] / l_loc[g])
                    lse[b, hk * G + g] = m_loc[g] + T.log2(l_loc[g])
    # fmt: on
    return batch_decode_paged_kv


# -- plugging the kernels into the KV cache ------------------------------------------------------
_OWN = {
    "_attention_decode_cpu": attention_decode_cpu,
    "_attention_prefill_cpu": attention_prefill_cpu,
    "_attention_prefill_ragged_cpu": attention_prefill_ragged_cpu,
    "llama_rope_with_position_map": rope_with_position_map_cpu,
}
_WINDOWED = ("_attention_decode_cpu", "_attention_prefill_cpu", "_attention_prefill_ragged_cpu")
_use_own_kernels = True


@contextlib.contextmanager
def stock_kernels() -> Iterator[None]:
    """Within this block `CPUPagedKVCache` builds TVM's stock kernels (for benchmarks/tests).

    The compile cache key does not see this switch: compile the stock variant into its own
    cache directory (or with force=True).
    """
    global _use_own_kernels
    saved, _use_own_kernels = _use_own_kernels, False
    try:
        yield
    finally:
        _use_own_kernels = saved


@contextlib.contextmanager
def _factories_swapped(window: int, sink: int) -> Iterator[None]:
    """Point kv_cache's kernel-factory globals at ours for the duration of one construction.

    TIRPagedKVCache.__init__ assembles the ~30 positional arguments of
    `vm.builtin.paged_attention_kv_cache_create` itself, looking the `_attention_*_cpu`
    factories up as module globals; swapping them there (instead of copying that argument list)
    keeps the argument order owned by TVM. Our factories take the same arguments.
    """
    own = {name: functools.partial(f, window=window, sink=sink) if name in _WINDOWED else f
           for name, f in _OWN.items()}  # fmt: skip
    with _SWAP_LOCK:
        saved = {name: getattr(_kvc, name) for name in own}
        try:
            for name, factory in own.items():
                setattr(_kvc, name, factory)
            yield
        finally:
            for name, factory in saved.items():
                setattr(_kvc, name, factory)


class CPUPagedKVCache(_kvc.TIRPagedKVCache):  # pylint: disable=too-few-public-methods
    """`TIRPagedKVCache` whose llvm decode / prefill / ragged-prefill kernels are ours."""

    def __init__(self, *args: Any, window: int = 0, sink: int = 0, **kwargs: Any) -> None:
        """`window`: the sliding window of the layers that attend with a negative sm_scale
        (models/llama.py); 0 when the model has none. `sink`: the first positions those layers
        always see (attention sinks; 0: none)."""
        target = kwargs.get("target")
        if not _use_own_kernels or target is None or target.kind.name != "llvm":
            super().__init__(*args, **kwargs)
            return
        with _factories_swapped(window, sink):
            super().__init__(*args, **kwargs)
