"""Hand-written CPU schedules for the PrimFuncs of models/llama.py.

Untuned TVM CPU code runs every kernel as one serial scalar loop nest (5-40x slow). The rules here:

- matmul over tile16 weights ("matmul_tile", "matmul_group" in quantization.matmul_tile16_te,
  docs/discussion/0005): a register-blocked micro-kernel, rows x tiles x 16 features of
  accumulators, the symbolic row count padded so no predicate reaches the inner loop; tiles in
  parallel. (q4 layers on VNNI CPUs use the hand-written int8_cpu.py kernels instead.)
- matmul over weights in MLC's (N, K) layout ("matmul": layers whose output features are not a
  multiple of 16, e.g. a 300-token vocabulary): the plain tiled schedule, output tiles of 16
  features in parallel, reduction innermost (LLVM vectorises the dot product with the fast-math
  reassoc/contract target flags set in compile.py), epilogues per row-tile.
- rms_norm: parallel over rows, sum of squares computed at the row.
- moe_matmul, moe_group (the experts of an MoE layer): schedule_moe.py.
- injective (embedding take, split/silu/multiply, index, adds): outer loops fused and parallel,
  innermost loop vectorised.

Functions that came with the KV cache (attention, paging, RoPE kernels) are tagged "foreign" before
legalization by `tag_foreign_pass` and never touched: several are hand-written TIR with their own
loop structure. Order matters in two places: `parallel` must come before `decompose_reduction`,
and an epilogue must be moved with `reverse_compute_at` (a reduction block cannot absorb it).

The compile cache key covers this file's source (build_info.source_digest): any change here
recompiles cached libraries, with nothing to bump by hand.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from mlctrio.models.quantization import ELEMS_PER_WORD, GROUP_ROWS
from mlctrio.models.schedule_moe import schedule_moe_group, schedule_moe_matmul

log = logging.getLogger(__name__)

FOREIGN_ATTR = "mlctrio.foreign"
# What a schedule primitive raises when it does not apply (ScheduleError is a RuntimeError; FFI
# argument checks raise ValueError / TypeError).
_SCHEDULE_ERRORS = (RuntimeError, ValueError, TypeError)
MATMUL_TILE = 16  # output features per tile: 16 rows x K of weights stays in L1/L2
# Register blocks (rows, tiles of 16 features) of the tile16 micro-kernel (accumulator R x C x 16
# float32). 4 x 4 measured best for 128 and 8-16 rows (768 -> 4096: ~200 GFLOPS vs 120-150 for
# session 2's register-blocked kernel on the (N, K) layout), 4 x 2 close.
TILE_BLOCK = (4, 4)  # prefill and batch decode alike
TILE_K_UNROLL = 4
DECODE_K_CHUNK = 64  # K per L1 pass of a tile group in batch decode (4 tiles: 16 KiB)
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
            sch = _schedule_func_with_fallback(func, gv.name_hint)
            if sch is None:  # keep the (correct, slow) unscheduled function
                continue
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply


def _schedule_func_with_fallback(func: tirx.PrimFunc, name: str) -> s_tir.Schedule | None:
    """The schedule of one PrimFunc, or None (kept unscheduled: correct, slow) if a rule fails."""
    sch = s_tir.Schedule(func)
    try:
        _schedule_func(sch)
    except _SCHEDULE_ERRORS as exc:
        log.warning("no CPU schedule for %s: %s", name, str(exc).splitlines()[0])
        return None
    return sch


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
    except _SCHEDULE_ERRORS:  # hand-written TIR without a root block: certainly not ours
        return False
    return any(_block_kind(sch, b) is not None for b in blocks)


def _schedule_func(sch: s_tir.Schedule) -> None:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    kinds = {sch.get(b).name_hint: _block_kind(sch, b) for b in blocks}
    handled: set[str] = set()
    for b in blocks:
        kind = _block_kind(sch, b)
        if kind == "matmul_tile":
            handled |= _schedule_matmul_tile(sch, b)
        elif kind == "matmul_group":
            handled |= _schedule_matmul_group(sch, b)
        elif kind == "matmul":
            handled |= _schedule_matmul(sch, b)
        elif kind == "rms_norm":
            handled |= _schedule_rms_norm(sch, b)
        elif kind == "moe_matmul":  # mixture-of-experts layers (te_moe.py)
            handled |= schedule_moe_matmul(sch, b)
        elif kind == "moe_group":
            handled |= schedule_moe_group(sch, b)
    # Everything else: inline what can be inlined, then parallel + vectorise what remains.
    for name in kinds:
        if name in handled:
            continue
        block = sch.get_sblock(name)
        if _is_spatial(sch, block) and sch.get_consumers(block):
            try:
                sch.compute_inline(block)
                continue
            except _SCHEDULE_ERRORS:
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
    dequant = [p for p in sch.get_producers(block) if _block_kind(sch, p) == "dequant"]
    handled |= _dequant_per_tile(sch, dequant, n_o)
    # Epilogues (residual add, bias add, cast) follow the tile they consume.
    consumers = sch.get_consumers(block)
    while len(consumers) == 1 and _is_spatial(sch, consumers[0]):
        epi = consumers[0]
        handled.add(sch.get(epi).name_hint)
        sch.reverse_compute_at(epi, rows)
        consumers = sch.get_consumers(epi)
    sch.decompose_reduction(block, red[0])
    return handled


def _dequant_per_tile(
    sch: s_tir.Schedule, dequant: list[s_tir.schedule.SBlockRV], tile_loop: s_tir.schedule.LoopRV
) -> set[str]:
    """Dequantise the weight tile once per output tile (every row of the batch reuses it), the 8
    nibbles of one uint32 word vectorised: broadcast word, shift by a constant ramp."""
    names = set()
    for producer in dequant:
        sch.compute_at(producer, tile_loop)
        _, k_loop = sch.get_loops(producer)[-2:]
        _, nibble = sch.split(k_loop, [None, 8])
        sch.vectorize(nibble)
        names.add(sch.get(producer).name_hint)
    return names


def _schedule_matmul_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """(b, s, N/16, 16, k) matmul over tile16 weights (quantization.matmul_tile16_te).

    Micro-kernel: an accumulator of R rows x C tiles x 16 lanes in registers; per k, C contiguous
    16-float weight loads, R broadcast activations and R*C FMAs; no cross-lane sum at the end.
    The symbolic row dimension is padded to a multiple of R (`pad_einsum`), so no predicate
    reaches the inner loop. Tile groups (C x 16 features) are parallel and outermost; k is
    unrolled by TILE_K_UNROLL. A q4 "dequant" stage is computed per tile group, in the same
    layout, and reused by every row. Batch decode (b, 1) walks K in DECODE_K_CHUNK chunks with
    every row block inside a chunk (discussion 0005, section 4).
    """
    name = sch.get(block).name_hint
    i, j, no, _, k = sch.get_loops(block)
    ci, cj = _const(sch.get(i).extent), _const(sch.get(j).extent)
    n_tiles, k_extent = _const(sch.get(no).extent), _const(sch.get(k).extent)
    if n_tiles is None or k_extent is None:
        raise ValueError("tile16 matmul with symbolic features or reduction")
    (rows_block, cols), pad, k_chunk = TILE_BLOCK, None, None
    if ci is not None and cj is not None:  # static rows: the `decode` GEMV, one stream
        rows_block, cols = 1, 1
    elif cj is None:  # prefill / verify: (1 or b, s)
        pad = [1, rows_block, 1, 1, 1]
    else:  # decode: (b, 1)
        pad = [rows_block, 1, 1, 1, 1]
        if k_extent % DECODE_K_CHUNK == 0 and k_extent > DECODE_K_CHUNK:
            k_chunk = DECODE_K_CHUNK
    cols = max(c for c in range(1, cols + 1) if n_tiles % c == 0)
    unroll_k = max(u for u in (1, 2, 4) if k_extent % u == 0 and u <= TILE_K_UNROLL)
    dequant = [p for p in sch.get_producers(block) if _block_kind(sch, p) == "dequant"]
    handled = {name}
    if pad is not None:
        sch.pad_einsum(block, pad)
        handled |= _schedule_padding(sch, block)
    i, j, no, ni, k = sch.get_loops(block)
    rows = sch.fuse(i, j)
    r_o, r_i = sch.split(rows, [None, rows_block])
    n_o, n_c = sch.split(no, [None, cols])
    if k_chunk is not None:
        # Batch decode: every row block takes a chunk of K while its weights are in L1, so
        # the weights stream from memory once instead of once from memory and again from L2
        # per further row block; the accumulators live in the output across chunks.
        k_c, k_o, k_i = sch.split(k, [None, k_chunk // unroll_k, unroll_k])
        sch.reorder(n_o, k_c, r_o, k_o, k_i, n_c, r_i, ni)
        init_at = k_c
    else:
        k_o, k_i = sch.split(k, [None, unroll_k])
        sch.reorder(n_o, r_o, k_o, k_i, n_c, r_i, ni)
        init_at = k_o
    sch.parallel(n_o)
    if k_chunk is None:  # the accumulator block lives in registers for all of K
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, r_o)
        sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(ni)
    for loop in (r_i, n_c, k_i):
        sch.unroll(loop)
    init = sch.decompose_reduction(block, init_at)
    sch.vectorize(sch.get_loops(init)[-1])
    for producer in dequant:  # (tiles, k, 16): 16 contiguous words / scales per vector
        sch.compute_at(producer, n_o)
        sch.vectorize(sch.get_loops(producer)[-1])
        handled.add(sch.get(producer).name_hint)
    return handled


def _schedule_padding(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """The two copies `pad_einsum` added around `block`: the input copy stays a separate (cheap)
    loop (inlined, it would put a bounds check into the innermost loop); the un-padding output
    copy goes into its consumer if there is one."""
    handled = set()
    for producer in sch.get_producers(block):
        pname = sch.get(producer).name_hint
        if pname.endswith("_pad"):
            _schedule_spatial(sch, producer)
            handled.add(pname)
    for consumer in sch.get_consumers(block):
        if sch.get_consumers(consumer):
            sch.compute_inline(consumer)
        else:
            _schedule_spatial(sch, consumer)
    return handled


def _schedule_matmul_group(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """q4 decode matmul over tile16 weights with the group scale factored out (the
    "matmul_group" form of quantization.matmul_tile16_te).

    Per 16-feature tile (parallel), block of R rows and group: an R x 16-lane local accumulator
    of nibble * x over the group's 32 inputs (one 16-word load per 8 inputs, then per input:
    shift, and, convert once and one FMA per row with the broadcast x), folded into the R x 16
    output accumulator with the tile's 16 scales. The weights of a tile (K / 2 bytes) stay in
    L1 while every row block reuses them. The sum of x over each group ("group_xsum", rows x
    K / 32 values) is computed once before; the zero-padded input copy is its own loop.
    """
    handled = {sch.get(block).name_hint}
    producers = {_block_kind(sch, p): p for p in sch.get_producers(block)}
    gdot, xsum = producers.get("group_dot"), producers.get("group_xsum")
    if gdot is None or xsum is None:
        raise ValueError("matmul_group without its group_dot / group_xsum stages")
    handled |= {sch.get(gdot).name_hint, sch.get(xsum).name_hint}
    for pad in sch.get_producers(gdot):
        if _block_kind(sch, pad) == "row_pad":
            _schedule_spatial(sch, pad)
            handled.add(sch.get(pad).name_hint)
    i, j, no, ni, gr = sch.get_loops(block)
    static_rows = _const(sch.get(i).extent) is not None
    rows = sch.fuse(i, j)
    ann = sch.get(block).annotations
    block_rows = int(ann["mlctrio.group_rows"]) if "mlctrio.group_rows" in ann else GROUP_ROWS
    r_o, r_i = sch.split(rows, [None, 1 if static_rows else block_rows])
    sch.reorder(no, r_o, gr, r_i, ni)
    sch.parallel(no)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, r_o)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.compute_at(gdot, gr)
    sch.set_scope(gdot, 0, "local")
    *_, lanes, kk = sch.get_loops(gdot)
    inner = [lp for lp in sch.get_loops(gdot)[3:-2]]  # the row block (absent for one row)
    kk_o, kk_i = sch.split(kk, [None, ELEMS_PER_WORD])
    sch.reorder(kk_o, kk_i, *inner, lanes)
    sch.vectorize(lanes)
    sch.unroll(kk_i)
    for loop in inner:
        sch.unroll(loop)
    init = sch.decompose_reduction(gdot, kk_o)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(ni)
    sch.unroll(r_i)
    init = sch.decompose_reduction(block, gr)
    sch.vectorize(sch.get_loops(init)[-1])
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
