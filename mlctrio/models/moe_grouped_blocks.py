# ruff: noqa: E501  (TVMScript kernel bodies read better unwrapped, as in TVM's own kernel files)
"""Register blocks of the grouped expert GEMM over group-quantized tile16 weights (TVMScript
macros for moe_grouped.py's kernels).

A block multiplies `rows` source rows (gathered through `row`) by `tiles` weight tiles of 16
features of one expert, over all K, into `acc[c, r * stride, 0:16]`. Two kinds, chosen per
expert by its row count (moe_grouped.DIRECT_BELOW):

- buffered: the expert's tiles were dequantised once (`dequant`, float32 (tiles, K, 16)) and
  every block of rows takes them as outer products, one vector load per k for all rows. A block
  keeps tiles x ROWS chains of FMAs in flight whatever its rows: fewer rows split k into
  ROWS / rows phases (stride), summed at the end (a lone row would otherwise wait on one FMA's
  latency per k).
- direct: no workspace; the stored integers of a group are converted once per block (shift,
  and, convert: shared by its rows, as the per-token kernel's "group_dot"), each row's group
  dot taken in float and scaled per group with the inputs' group sum,
  scale * (dot - zero * sum) or scale * dot + min * sum (stride 1). Three vector ops per 16
  weights instead of five plus a store and a load: cheaper while an expert has few rows.

Rules: every macro is hygienic (buffers and loop values come as arguments); constants (tiles,
rows, K, the spec) are the factories'; lanes are always TILE (16 float32, one AVX-512 vector).
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from mlctrio.models.quantization import TILE, QuantSpec

ROWS = 4  # rows per full register block (ROWS x 2 tiles of 16 float32 accumulators)


def stored_f32(spec: QuantSpec, qw: Any, e: Any, tile: Any, word8: Any, ki: Any, lane: Any) -> Any:
    """The stored integer of weight (k = 8 word8 + ki, feature 16 tile + lane) of expert e as
    float32 (te_ops._stored's nibble / byte order, tile16 layout)."""
    if spec.bits == 4:
        word, shift, mask = qw[e, tile, word8, lane], ki * 4, 0xF
    else:
        word, shift, mask = qw[e, tile, word8 * 2 + ki % 2, lane], ki // 2 * 8, 0xFF
    return T.Cast(
        "float32", T.bitwise_and(T.shift_right(word, T.Cast("uint32", shift)), T.uint32(mask))
    )


def _scaled(
    spec: QuantSpec, qs: Any, e: Any, tile: Any, group: Any, lane: Any, dot: Any, xsum: Any
) -> Any:
    """sum_k x[k] * w[k] over one group from dot = sum_k x[k] * stored[k], xsum = sum_k x[k]."""
    scale = T.Cast("float32", qs[e, tile, group * spec.scales_per_group, lane])
    if spec.has_min:
        return scale * dot + T.Cast("float32", qs[e, tile, group * 2 + 1, lane]) * xsum
    return scale * (dot - T.float32(spec.zero) * xsum)


def _dequant(
    spec: QuantSpec, qw: Any, qs: Any, e: Any, tile: Any, ko: Any, ki: Any, lane: Any
) -> Any:
    """Weight (k = 8 ko + ki, feature 16 tile + lane) of expert e, float32."""
    value = stored_f32(spec, qw, e, tile, ko, ki, lane)
    group = ko // (spec.group_size // 8)
    scale = T.Cast("float32", qs[e, tile, group * spec.scales_per_group, lane])
    if spec.has_min:
        return value * scale + T.Cast("float32", qs[e, tile, group * 2 + 1, lane])
    return (value - T.float32(spec.zero)) * scale


def dequant_macro(spec: QuantSpec, kin: int) -> Any:
    """dequant(wt, c, qw, qs, e, tile): wt[c] (kin, 16) = expert e's tile `tile`, float32."""

    # fmt: off
    @T.macro
    def dequant(wt, c, qw, qs, e, tile):
        for ko in T.serial(kin // 8):
            for ki in T.unroll(8):
                for lane in T.vectorized(TILE):
                    wt[c, ko * 8 + ki, lane] = _dequant(spec, qw, qs, e, tile, ko, ki, lane)
    # fmt: on
    return dequant


def buffered_block(tiles: int, rows: int, kin: int) -> Any:
    """block(acc, gd, xs, wt, qw, qs, e, t0, src, row): acc[c, r * (ROWS / rows), 0:16] =
    sum_k src[row[r], k] * wt[c, k, 0:16] (gd, xs, qw, qs, e, t0 unused)."""
    split = ROWS // rows

    # fmt: off
    @T.macro
    def block(acc, gd, xs, wt, qw, qs, e, t0, src, row):
        for c in T.unroll(tiles):
            for a in T.unroll(ROWS):
                for lane in T.vectorized(TILE):
                    acc[c, a, lane] = T.float32(0)
        for ko in T.serial(kin // split):
            for u in T.unroll(split):
                for c in T.unroll(tiles):
                    for r in T.unroll(rows):
                        for lane in T.vectorized(TILE):
                            acc[c, r * split + u, lane] += src[row[r], ko * split + u] * wt[c, ko * split + u, lane]
        for c in T.unroll(tiles):
            for r in T.unroll(rows):
                for u in T.unroll(1, split):
                    for lane in T.vectorized(TILE):
                        acc[c, r * split, lane] += acc[c, r * split + u, lane]
    # fmt: on
    return block


def direct_block(spec: QuantSpec, tiles: int, tstep: int, rows: int, kin: int) -> Any:
    """block(acc, gd, xs, wt, qw, qs, e, t0, src, row): acc[c, r, 0:16] = sum_k src[row[r], k]
    * W[e, tile t0 + c * tstep][k, 0:16] from the stored tensors (wt unused); gd (tiles, ROWS,
    16) holds the group dots, xs (ROWS,) the group sums."""
    G = spec.group_size

    # fmt: off
    @T.macro
    def block(acc, gd, xs, wt, qw, qs, e, t0, src, row):
        for c in T.unroll(tiles):
            for r in T.unroll(rows):
                for lane in T.vectorized(TILE):
                    acc[c, r, lane] = T.float32(0)
        for g in T.serial(kin // G):
            for c in T.unroll(tiles):
                for r in T.unroll(rows):
                    for lane in T.vectorized(TILE):
                        gd[c, r, lane] = T.float32(0)
            for r in T.unroll(rows):
                xs[r] = T.float32(0)
            for ko in T.serial(G // 8):
                for ki in T.unroll(8):
                    for r in T.unroll(rows):
                        xs[r] += src[row[r], g * G + ko * 8 + ki]
                    for c in T.unroll(tiles):
                        for r in T.unroll(rows):
                            for lane in T.vectorized(TILE):
                                gd[c, r, lane] += src[row[r], g * G + ko * 8 + ki] * stored_f32(spec, qw, e, t0 + c * tstep, g * (G // 8) + ko, ki, lane)
            for c in T.unroll(tiles):
                for r in T.unroll(rows):
                    for lane in T.vectorized(TILE):
                        acc[c, r, lane] += _scaled(spec, qs, e, t0 + c * tstep, g, lane, gd[c, r, lane], xs[r])
    # fmt: on
    return block
