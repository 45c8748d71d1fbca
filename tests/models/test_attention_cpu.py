"""Our CPU attention kernels (models/attention_cpu.py) against TVM's stock ones on the same inputs.

Tolerances: both compute in float32 with an online softmax; ours sums in a different order
(blocked, vectorised, fast-math reassoc) and uses a polynomial exp2 (relative error 1.04e-7).
Observed differences are ~1e-6 on outputs (convex combinations of V, |V| < 5) and ~1e-5 on the
base-2 LSE (magnitude up to ~20). ATOL_O = 2e-5 / ATOL_LSE = 2e-4 are ~10x that, while any real
bug (wrong page, off-by-one causal mask, wrong GQA head, missing rescale) moves outputs by >1e-2.
Empty prefixes must give the stock "empty" state exactly: output 0, LSE -5e4.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm

from mlctrio.models import attention_cpu as ac
from mlctrio.models.compile import build_irmodule, host_cpu_target
from mlctrio.models.llama_config import TINY

pytestmark = pytest.mark.slow

ATOL_O, ATOL_LSE = 2e-5, 2e-4
D, PAGE = 64, 16
GQA = [(4, 4), (4, 2), (8, 2)]  # (h_q, h_kv): group sizes 1, 2, 4
_STOCK_ARGS = {
    "decode": ac._STOCK["decode"],
    "prefill": ac._STOCK["prefill"],
    "ragged": ac._STOCK["ragged"],
}
_OWN_ARGS = {
    "decode": ac.attention_decode_cpu,
    "prefill": ac.attention_prefill_cpu,
    "ragged": ac.attention_prefill_ragged_cpu,
}


@functools.cache
def _kernel(kind: str, own: bool, h_q: int, h_kv: int, slid: bool = False):
    factory = (_OWN_ARGS if own else _STOCK_ARGS)[kind]
    if kind == "ragged":
        func = factory(h_kv, h_q, D, D, "float32", {})
    else:
        func = factory(h_kv, h_q, D, "float32", slid, {})
    return tvm.compile(tvm.IRModule({"main": func}), target=host_cpu_target())["main"]


def _t(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(a, tvm.cpu())


def _paged(rng: np.random.Generator, h_kv: int, kv_lens: list[int]):
    """Pages in shuffled order with NaN in every unused slot (kernels must not read them)."""
    n_pages = [-(-n // PAGE) for n in kv_lens]
    total = sum(n_pages) + 3
    pages = rng.standard_normal((total, 2, h_kv, PAGE, D)).astype("float32")
    values = rng.permutation(total)[: sum(n_pages)].astype("int32")
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype("int32")
    pairs = list(zip(kv_lens, n_pages, strict=True))
    last = np.array([n - (p - 1) * PAGE if p else 0 for n, p in pairs], "int32")
    for b, p in enumerate(n_pages):
        if p:
            pages[values[indptr[b] + p - 1], :, :, last[b] :, :] = np.nan
    return pages, indptr, values, last


def _run(kind: str, h_q: int, h_kv: int, inputs: list, n_out: int, scalars: list, slid=False):
    results = []
    for own in (False, True):
        out = _t(np.zeros((n_out, h_q, D), "float32"))
        lse = _t(np.zeros((n_out, h_q), "float32"))
        _kernel(kind, own, h_q, h_kv, slid)(*[_t(a) for a in inputs], out, lse, *scalars)
        results.append((out.numpy(), lse.numpy()))
    (o_ref, l_ref), (o, lse_) = results
    assert np.isfinite(o).all() and np.isfinite(lse_).all()
    np.testing.assert_allclose(o, o_ref, atol=ATOL_O, rtol=0)
    np.testing.assert_allclose(lse_, l_ref, atol=ATOL_LSE, rtol=0)
    return o, lse_


@pytest.mark.parametrize(("h_q", "h_kv"), GQA)
@pytest.mark.parametrize("rotary_mode", [0, 1])
def test_decode_matches_stock(h_q: int, h_kv: int, rotary_mode: int) -> None:
    rng = np.random.default_rng(h_q * 10 + h_kv + rotary_mode)
    kv_lens = [1, 15, 16, 17, 100, 300]  # within one page, exactly one page, > 1 page
    pages, indptr, values, last = _paged(rng, h_kv, kv_lens)
    b = len(kv_lens)
    q = rng.standard_normal((b, h_q, D)).astype("float32")
    k_off = np.zeros(b, "int32")
    q_pos = np.array(kv_lens, "int32") - 1
    inputs = [q, pages, indptr, values, last, k_off, q_pos]
    _run("decode", h_q, h_kv, inputs, b, [rotary_mode, 1.0, 10000.0, D**-0.5])


@pytest.mark.parametrize(("h_q", "h_kv"), GQA)
@pytest.mark.parametrize("rotary_mode", [0, 1])
def test_ragged_prefill_matches_stock(h_q: int, h_kv: int, rotary_mode: int) -> None:
    rng = np.random.default_rng(100 + h_q * 10 + h_kv + rotary_mode)
    lens = [5, 1, 17, 33, 70]  # tiles straddle sequence boundaries, blocks cross 16
    n = sum(lens)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    q = rng.standard_normal((n, h_q, D)).astype("float32")
    k = rng.standard_normal((n, h_kv, D)).astype("float32")
    v = rng.standard_normal((n, h_kv, D)).astype("float32")
    q_pos = np.concatenate([np.arange(m) + 7 for m in lens]).astype("int32")
    k_off = np.full(len(lens), 7, "int32")
    inputs = [q, indptr, k, v, indptr, q_pos, k_off]
    _run("ragged", h_q, h_kv, inputs, n, [1, rotary_mode, 1.0, 10000.0, D**-0.5])


@pytest.mark.parametrize(("h_q", "h_kv"), GQA)
@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_matches_stock(h_q: int, h_kv: int, causal: int) -> None:
    rng = np.random.default_rng(200 + h_q * 10 + h_kv + causal)
    q_lens = [3, 20, 1, 9]
    kv_lens = [40, 0, 16, 129]  # a sequence without a cached prefix gets the empty state
    if causal:
        kv_lens[1] = 20
    pages, indptr, values, last = _paged(rng, h_kv, kv_lens)
    n = sum(q_lens)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    q = rng.standard_normal((n, h_q, D)).astype("float32")
    k_off = np.zeros(len(q_lens), "int32")
    q_pos = np.arange(n, dtype="int32")
    inputs = [q, q_indptr, pages, indptr, values, last, k_off, q_pos]
    o, lse = _run("prefill", h_q, h_kv, inputs, n, [causal, 0, 1.0, 10000.0, D**-0.5])
    if not causal:
        empty = slice(q_indptr[1], q_indptr[2])
        assert (o[empty] == 0).all() and (lse[empty] == -5e4).all()


def test_kv_cache_uses_our_kernels_on_llvm_only() -> None:
    mod, _ = build_irmodule(TINY, "q0f32", host_cpu_target())
    names = {gv.name_hint: f for gv, f in mod.functions_items()}
    for name in (
        "batch_decode_paged_kv_cpu",
        "batch_prefill_paged_kv_cpu",
        "batch_prefill_ragged_kv",
        # the variants for the cache's sliding-window mode (slid page layout: test_kv_window.py)
        "batch_decode_paged_kv_cpu_slid",
        "batch_prefill_paged_kv_cpu_slid",
    ):
        assert "T.parallel" in names[name].script(), name
    with ac.stock_kernels():
        stock, _ = build_irmodule(TINY, "q0f32", host_cpu_target())
    assert "T.parallel" not in stock["batch_decode_paged_kv_cpu"].script()
    # The factory swap is undone after construction.
    from tvm.relax.frontend.nn.llm import kv_cache

    assert kv_cache._attention_decode_cpu is ac._STOCK["decode"]


def _slid_pages(rng: np.random.Generator, h_kv: int, layouts: list[tuple[int, int, int]]):
    """Pages in the cache's sliding-window layout, per sequence (length, sink, offset): columns
    [0, sink) sinks, [sink, offset) released slots (NaN), then the window's length - sink
    tokens; length_info is (3, B): last page length, offset, sink."""
    cols = [o + n - s for n, s, o in layouts]
    kv_pages, indptr, values, last = _paged(rng, h_kv, cols)
    for b, (_, s, o) in enumerate(layouts):
        for c in range(s, o):
            kv_pages[values[indptr[b] + c // PAGE], :, :, c % PAGE, :] = np.nan
    info = np.stack([last, [o for *_, o in layouts], [s for _, s, _ in layouts]]).astype("int32")
    return kv_pages, indptr, values, info


# (logical length, sink, window's first column): no sinks with the window mid-page or aligned,
# sinks ending mid-page with the window in the same page or the next, a sink of whole pages.
SLID = [(40, 0, 5), (33, 0, 0), (50, 4, 9), (30, 4, 16), (64, 16, 16), (20, 16, 27)]


@pytest.mark.parametrize(("h_q", "h_kv"), GQA)
@pytest.mark.parametrize("rotary_mode", [0, 1])
def test_slid_layout_decode_matches_stock(h_q: int, h_kv: int, rotary_mode: int) -> None:
    """The cache's sliding-window mode: TVM's stock kernels for it attend to every held key
    (sinks, then the window); ours too for a full layer (sm_scale > 0), positions by the held
    order (inline RoPE by angle addition: rope_inline_cpu.py)."""
    rng = np.random.default_rng(300 + h_q * 10 + h_kv + rotary_mode)
    pages, indptr, values, info = _slid_pages(rng, h_kv, SLID)
    b = len(SLID)
    q = rng.standard_normal((b, h_q, D)).astype("float32")
    k_off = np.zeros(b, "int32")
    q_pos = np.array([n for n, _, _ in SLID], "int32")
    inputs = [q, pages, indptr, values, info, k_off, q_pos]
    _run("decode", h_q, h_kv, inputs, b, [rotary_mode, 1.0, 10000.0, D**-0.5], slid=True)


@pytest.mark.parametrize(("h_q", "h_kv"), GQA)
@pytest.mark.parametrize("rotary_mode", [0, 1])
def test_slid_layout_paged_prefill_matches_stock(h_q: int, h_kv: int, rotary_mode: int) -> None:
    rng = np.random.default_rng(400 + h_q * 10 + h_kv + rotary_mode)
    pages, indptr, values, info = _slid_pages(rng, h_kv, SLID)
    q_lens = [3, 1, 9, 20, 2, 5]
    n = sum(q_lens)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    q = rng.standard_normal((n, h_q, D)).astype("float32")
    k_off = np.zeros(len(q_lens), "int32")
    q_pos = np.concatenate([np.arange(m) + k for m, (k, _, _) in zip(q_lens, SLID, strict=True)])
    inputs = [q, q_indptr, pages, indptr, values, info, k_off, q_pos.astype("int32")]
    _run("prefill", h_q, h_kv, inputs, n, [0, rotary_mode, 1.0, 10000.0, D**-0.5], slid=True)
