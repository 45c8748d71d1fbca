"""Hand-written CPU schedules for the PrimFuncs of models/llama.py.

Untuned TVM CPU code runs every kernel as one serial scalar loop nest (5-40x slow). The rules here:

- matmul (the `te.compute` named "matmul" in quantization.py, with dequantization inside): split the
  output features into tiles, parallelise over tiles (outer), then rows, then the tile, with the
  reduction innermost so LLVM vectorises the dot product (needs the fast-math reassoc/contract
  target flags set in compile.py). A weight tile stays in L1 while every row of a batch reuses it,
  which is what gives batched decode its throughput. Epilogues (residual add, bias) fused by FuseOps
  are computed per row-tile right after the reduction.
- rms_norm: parallel over rows, sum of squares computed at the row.
- injective (embedding take, split/silu/multiply, index, adds): outer loops fused and parallel,
  innermost loop vectorised.

Functions that came with the KV cache (attention, paging, RoPE kernels) are tagged "foreign" before
legalization by `tag_foreign_pass` and never touched: several are hand-written TIR with their own
loop structure. Order matters in two places: `parallel` must come before `decompose_reduction`,
and an epilogue must be moved with `reverse_compute_at` (a reduction block cannot absorb it).

Bump SCHEDULE_VERSION on any change here: it is part of the compile cache key.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

log = logging.getLogger(__name__)

SCHEDULE_VERSION = "cpu-6"  # cpu-6: own attention kernels (attention_cpu.py)
FOREIGN_ATTR = "mlctrio.foreign"
MATMUL_TILE = 16  # output features per tile: 16 rows x K of weights stays in L1/L2
VECTOR_LANES = 16


def tag_foreign_pass() -> tvm.transform.Pass:
    """Mark every PrimFunc that exists before legalization and is not ours as foreign."""

    @tvm.transform.module_pass(opt_level=0, name="MlctrioTagForeign")
    def _tag(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _has_kind(func):
                updates[gv] = func.with_attr(FOREIGN_ATTR, True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _tag


def cpu_schedule_pass() -> tvm.transform.Pass:
    """Schedule every PrimFunc of ours that is not yet scheduled; leave foreign ones alone."""

    @tvm.transform.module_pass(opt_level=0, name="MlctrioCPUSchedule")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _skip(func):
                continue
            sch = s_tir.Schedule(func)
            try:
                _schedule_func(sch)
            except tvm.TVMError as exc:  # keep the (correct, slow) unscheduled function
                log.warning("no CPU schedule for %s: %s", gv.name_hint, str(exc).splitlines()[0])
                continue
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply


def _skip(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs or {}
    return bool(attrs.get(FOREIGN_ATTR, False)) or bool(attrs.get("tirx.is_scheduled", False))


def _block_kind(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> str | None:
    ann = sch.get(block).annotations
    return str(ann["mlctrio.kind"]) if "mlctrio.kind" in ann else None


def _has_kind(func: tirx.PrimFunc) -> bool:
    """Whether a top-level block carries our "mlctrio.kind" annotation (set in quantization.py)."""
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except tvm.TVMError:  # hand-written TIR without a root block: certainly not ours
        return False
    return any(_block_kind(sch, b) is not None for b in blocks)


def _schedule_func(sch: s_tir.Schedule) -> None:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    kinds = {sch.get(b).name_hint: _block_kind(sch, b) for b in blocks}
    handled: set[str] = set()
    for b in blocks:
        kind = _block_kind(sch, b)
        if kind == "matmul":
            handled |= _schedule_matmul(sch, b)
        elif kind == "rms_norm":
            handled |= _schedule_rms_norm(sch, b)
    # Everything else: inline what can be inlined, then parallel + vectorise what remains.
    for name in kinds:
        if name in handled:
            continue
        block = sch.get_sblock(name)
        if _is_spatial(sch, block) and sch.get_consumers(block):
            try:
                sch.compute_inline(block)
                continue
            except tvm.TVMError:
                pass
        _schedule_spatial(sch, block)


def _is_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _const(extent: object) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _schedule_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Fuse outer loops and run them in parallel; vectorise the innermost constant loop."""
    if not _is_spatial(sch, block):
        return
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = _const(sch.get(inner).extent)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    if extent is not None and extent % VECTOR_LANES == 0:
        _, vec = sch.split(inner, [None, VECTOR_LANES])
        sch.vectorize(vec)


def _schedule_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """(b, s, n, *k) matmul: n-tiles parallel, rows, tile, reduction innermost (LLVM vectorises)."""
    i, j, n, *red = sch.get_loops(block)
    rows = sch.fuse(i, j)
    n_extent = _const(sch.get(n).extent) or 1
    tile = next(t for t in (MATMUL_TILE, 8, 4, 2, 1) if n_extent % t == 0)
    n_o, n_i = sch.split(n, [None, tile])
    sch.reorder(n_o, rows, n_i, *red)
    sch.parallel(n_o)
    handled = {sch.get(block).name_hint}
    for producer in sch.get_producers(block):
        kind = _block_kind(sch, producer)
        if kind == "dequant":
            # Dequantise the weight tile once per output tile; every row of the batch reuses it.
            # Vectorise the 8 nibbles of one uint32 word: broadcast word, shift by a constant ramp.
            sch.compute_at(producer, n_o)
            _, k_loop = sch.get_loops(producer)[-2:]
            _, nibble = sch.split(k_loop, [None, 8])
            sch.vectorize(nibble)
            handled.add(sch.get(producer).name_hint)
    # Epilogues (residual add, bias add, cast) follow the tile they consume.
    consumers = sch.get_consumers(block)
    while len(consumers) == 1 and _is_spatial(sch, consumers[0]):
        epi = consumers[0]
        handled.add(sch.get(epi).name_hint)
        sch.reverse_compute_at(epi, rows)
        consumers = sch.get_consumers(epi)
    sch.decompose_reduction(block, red[0])
    return handled


def _schedule_rms_norm(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """Rows in parallel; the row's sum of squares computed just before it is normalised."""
    producers = [p for p in sch.get_producers(block) if _block_kind(sch, p) == "rms_sumsq"]
    i, j, h = sch.get_loops(block)
    rows = sch.fuse(i, j)
    sch.parallel(rows)
    handled = {sch.get(block).name_hint}
    if producers:
        sumsq = producers[0]
        sch.compute_at(sumsq, rows)
        handled.add(sch.get(sumsq).name_hint)
        sch.decompose_reduction(sumsq, sch.get_loops(sumsq)[-1])
    h_extent = _const(sch.get(h).extent)
    if h_extent is not None and h_extent % VECTOR_LANES == 0:
        _, vec = sch.split(h, [None, VECTOR_LANES])
        sch.vectorize(vec)
    return handled
