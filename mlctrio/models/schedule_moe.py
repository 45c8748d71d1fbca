"""CPU schedules of the expert matmuls ("moe_matmul" and "moe_group" blocks of te_moe.py).

Rules:
- Called by schedules.py for a block of kind "moe_matmul"; returns the names of the blocks it
  scheduled (the matmul and its "dequant" producer); the rest (the gated activation, the
  residual add) is left to schedules.py's generic rules.
- Output tiles of 16 features of one (token, slot) are the parallel unit: decode at batch 1 has
  top_k * N / 16 of them, each streaming 16 rows of one chosen expert; the reduction is innermost
  (LLVM vectorises the dot product with the fast-math flags compile.py sets), as schedules.py's
  "matmul" rule for the (N, K) layout.
- The down projection sums over the slots too (reduction axes j, k): j goes outside the
  16-feature tile, so a "dequant" stage is computed per (tile, slot): 16 rows of one expert.
- Group-quantized experts in the tile16 layout ("moe_group") factor each group's scale out of
  its sum, as schedules.py's "matmul_group": 16 output features per vector, about 4 vector ops
  per 16 weights instead of a dequantised float tile.
- Self-contained (schedules.py imports this module, never the reverse).
"""

from __future__ import annotations

from tvm import s_tir, tirx

MOE_TILE = 16  # output features per parallel task


def _const(extent: object) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _kind(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> str | None:
    ann = sch.get(block).annotations
    return str(ann["mlctrio.kind"]) if "mlctrio.kind" in ann else None


def _axes(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> tuple[list, list]:
    """The block's loops split into spatial and reduction ones (one loop per block axis)."""
    spatial, red = [], []
    for loop, iv in zip(sch.get_loops(block), sch.get(block).iter_vars, strict=True):
        (spatial if iv.iter_type == tirx.IterVar.DataPar else red).append(loop)
    return spatial, red


def schedule_moe_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """(t, j, n | k) or (t, n | j, k): tiles of (token, slot, 16 features) in parallel."""
    spatial, red = _axes(sch, block)
    *outer, n = spatial
    n_extent = _const(sch.get(n).extent) or 1
    tile = next(t for t in (MOE_TILE, 8, 4, 2, 1) if n_extent % t == 0)
    n_o, n_i = sch.split(n, [None, tile])
    task = sch.fuse(*outer, n_o)
    *red_outer, k = red  # the slot axis of the down projection, then K
    sch.reorder(task, *red_outer, n_i, k)
    sch.parallel(task)
    handled = {sch.get(block).name_hint}
    at = red_outer[-1] if red_outer else task
    for producer in sch.get_producers(block):
        if _kind(sch, producer) != "dequant":
            continue
        sch.compute_at(producer, at)
        k_loop = sch.get_loops(producer)[-1]
        _, nibble = sch.split(k_loop, [None, 8])
        sch.vectorize(nibble)
        handled.add(sch.get(producer).name_hint)
    sch.decompose_reduction(block, red[0])
    return handled


def schedule_moe_group(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> set[str]:
    """The tile16 group form (te_moe.expert_group_matmul_te), as schedules.py's "matmul_group"
    with one row: (token, slot, 16-feature tile) tasks in parallel (down: (token, tile), the
    slots summed inside), a 16-lane accumulator in registers; per group, the 16 features' dot
    with its inputs ("group_dot", 16 lanes: one word load per 8 inputs, shift, and, convert,
    FMA with the broadcast input), then scaled. "group_xsum" stays a small serial loop."""
    producers = {_kind(sch, p): p for p in sch.get_producers(block)}
    gdot, xsum = producers.get("group_dot"), producers.get("group_xsum")
    if gdot is None or xsum is None:
        raise ValueError("moe_group without its group_dot / group_xsum stages")
    handled = {sch.get(b).name_hint for b in (block, gdot, xsum)}
    spatial, red = _axes(sch, block)
    *outer, lanes = spatial
    task = sch.fuse(*outer)
    sch.reorder(task, *red, lanes)
    sch.parallel(task)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, task)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.compute_at(gdot, red[-1])
    sch.set_scope(gdot, 0, "local")
    g_lanes, kk = sch.get_loops(gdot)[-2:]
    kk_o, kk_i = sch.split(kk, [None, 8])
    sch.reorder(kk_o, kk_i, g_lanes)
    sch.vectorize(g_lanes)
    sch.unroll(kk_i)
    init = sch.decompose_reduction(gdot, kk_o)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(lanes)
    init = sch.decompose_reduction(block, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return handled
