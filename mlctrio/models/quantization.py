"""Weight quantization: specs (q0f32, q0f16, q4f16_1, q4f32_1), their TE kernels, numpy packers.

Layout follows mlc-llm's group quantization with the "NK" linear layout (`q4*_1`), so MLC-format
weights load unchanged:

- a linear weight W of shape (out, in) becomes `q_weight` (out, in / 8) uint32 and `q_scale`
  (out, in / group_size) in the scale dtype;
- element k of a row sits in storage word k // 8 at bits 4 * (k % 8);
- stored nibbles are `round(w / scale) + 7` clipped to [0, 14], `scale = max|w| / 7` per group;
- dequantization is `(nibble - 7) * scale`.

On the CPU, linear weights whose output features split into tiles of 16 are re-laid out at load
time ("tile16", `pack_tile_np`): (out, x) -> (out / 16, x, 16), the 16 features of a tile
innermost. A matmul then multiplies one contiguous 16-lane weight vector by a broadcast activation
(no cross-lane sums, one sequential weight stream per tile), see schedules.py. Files keep MLC's
layout; only the arrays handed to the compiled module change.

On the CPU all activations stay float32 (x86 without native fp16 computes fp16 slowly); only the
stored weights shrink. Dequantization is written inside the matmul's `te.compute` because a separate
dequantize op is not fused into a matmul by Relax and would materialise the full f32 weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from mlctrio.models.fastmath import silu

NUM_BITS = 4
ELEMS_PER_WORD = 32 // NUM_BITS  # 8 nibbles per uint32
MAX_INT = 2 ** (NUM_BITS - 1) - 1  # 7: the zero point of the stored nibble


@attrs.frozen
class QuantSpec:
    """How weights are stored. `kind` "none": plain weights in `weight_dtype`; "group": 4-bit.

    `mlc_dtype` is the dtype mlc-llm stores the *unquantized* params in (norms, biases, scales) for
    this quantization name; our own packed params keep those in float32 on the CPU.
    """

    name: str
    kind: Literal["none", "group"]
    weight_dtype: str  # storage dtype of plain weights (kind "none") or "uint32"
    scale_dtype: str  # dtype of q_scale (kind "group"); unused for "none"
    mlc_dtype: str
    group_size: int = 32

    @property
    def is_group(self) -> bool:
        return self.kind == "group"


QUANTIZATIONS: dict[str, QuantSpec] = {
    "q0f32": QuantSpec("q0f32", "none", "float32", "float32", "float32"),
    "q0f16": QuantSpec("q0f16", "none", "float16", "float16", "float16"),
    "q4f16_1": QuantSpec("q4f16_1", "group", "uint32", "float16", "float16"),
    "q4f32_1": QuantSpec("q4f32_1", "group", "uint32", "float32", "float32"),
}


def get_quantization(name: str) -> QuantSpec:
    """Look a quantization up by its MLC name (q0f32, q0f16, q4f16_1, q4f32_1)."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; known: {sorted(QUANTIZATIONS)}") from None


TILE = 16  # output features per tile of the "tile16" CPU layout
GROUP_ROWS = 4  # rows per register block of the q4 decode kernel ("matmul_group")
TILE16 = "tile16"


def pack_tile_np(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """(out, x) -> (out / TILE, x, TILE): the "tile16" layout of a CPU linear weight."""
    rows, cols = arr.shape
    return np.ascontiguousarray(arr.reshape(rows // TILE, TILE, cols).transpose(0, 2, 1))


def unpack_tile_np(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Inverse of `pack_tile_np`."""
    tiles, cols, _ = arr.shape
    return np.ascontiguousarray(arr.transpose(0, 2, 1).reshape(tiles * TILE, cols))


# --------------------------------------------------------------------------------------------
# TE: a weight "view" W(n, k) -> float32 expression, used inside matmul / embedding computes.

WeightFn = Callable[[Any, Any], Any]


def _at(t: te.Tensor, n: Any, col: Any, packed: bool) -> Any:
    """Element (row n, column col) of a stored (out, x) tensor, in MLC or tile16 layout."""
    return t[n // TILE, col, n % TILE] if packed else t[n, col]


def _nibble(q_weight: te.Tensor, n: Any, k: Any, packed: bool) -> Any:
    """The stored 4-bit value (0..15, uint32) of weight (n, k)."""
    word = _at(q_weight, n, k // ELEMS_PER_WORD, packed)
    shift = (k % ELEMS_PER_WORD * NUM_BITS).astype("uint32")
    return tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(0xF, "uint32"))


def weight_fn(
    spec: QuantSpec, tensors: list[te.Tensor], act_dtype: str, packed: bool = False
) -> WeightFn:
    """Return W(n, k) as an expression of the stored tensors, in `act_dtype`."""
    if not spec.is_group:
        (w,) = tensors
        if w.dtype == act_dtype:
            return lambda n, k: _at(w, n, k, packed)
        return lambda n, k: _at(w, n, k, packed).astype(act_dtype)
    q_weight, q_scale = tensors
    group = spec.group_size

    def _deq(n: Any, k: Any) -> Any:
        centered = _nibble(q_weight, n, k, packed).astype(act_dtype) - tirx.const(
            MAX_INT, act_dtype
        )
        return centered * _at(q_scale, n, k // group, packed).astype(act_dtype)

    return _deq


def matmul_te(
    spec: QuantSpec, act_dtype: str, out_features: int, cpu_layout: bool = False
) -> Callable[..., te.Tensor]:
    """TE function (x (b, s, K), *stored weights) -> (b, s, N) = x @ W.T, dequantised in the loop.

    The reduction block is named "matmul" with block attr `mlctrio.kind = "matmul"` so the CPU
    schedules find it even after FuseTIR merged epilogues into the same PrimFunc.

    `cpu_layout` (group quantization, K % 8 == 0): dequantise through a separate "dequant" (N, K)
    stage. The CPU schedule computes it per output tile (so every row of a batch reuses the tile)
    and vectorises its 8 nibbles of one word (one broadcast word, shifts by <0, 4, ..., 28>, one
    broadcast scale); the matmul then reads plain float32 like q0f32. Dequantising inside the
    reduction instead made LLVM emit a gather per scale load (6x slower at batch 1).
    """

    def _simple(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        b, s, in_features = x.shape
        w = weight_fn(spec, list(ws), act_dtype)
        k = te.reduce_axis((0, in_features), name="k")
        return te.compute(
            (b, s, out_features),
            lambda i, j, n: te.sum(x[i, j, k].astype(act_dtype) * w(n, k), axis=k),
            name="matmul",
            attrs={"mlctrio.kind": "matmul"},
        )

    def _staged(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        b, s, in_features = x.shape
        w = weight_fn(spec, list(ws), act_dtype)
        wd = te.compute(
            (out_features, in_features), w, name="dequant", attrs={"mlctrio.kind": "dequant"}
        )
        k = te.reduce_axis((0, in_features), name="k")
        return te.compute(
            (b, s, out_features),
            lambda i, j, n: te.sum(x[i, j, k].astype(act_dtype) * wd[n, k], axis=k),
            name="matmul",
            attrs={"mlctrio.kind": "matmul"},
        )

    def _f(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        in_features = int(x.shape[2])
        if cpu_layout and spec.is_group and in_features % ELEMS_PER_WORD == 0:
            return _staged(x, *ws)
        return _simple(x, *ws)

    return _f


def uses_int8(spec: QuantSpec, out_features: int, in_features: int) -> bool:
    """Whether this linear layer takes int8 activations (int8_cpu.py) on a CPU with VNNI:
    group-quantized, tile16 layout, whole groups."""
    return (
        spec.is_group
        and spec.group_size == 32
        and out_features % TILE == 0
        and in_features % spec.group_size == 0
    )


def q8_activations_np(x: npt.NDArray[np.float32], group: int = 32) -> npt.NDArray[np.float32]:
    """x (..., K) as int8_cpu.q8_quantize sees it: per group of `group`, q = rint(x * (127 /
    max|x|)) in float32 arithmetic, value q * (max|x| / 127)."""
    shape = x.shape
    g = x.astype(np.float32).reshape(-1, shape[-1] // group, group)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(g * inv)
    out: npt.NDArray[np.float32] = (q * (amax / np.float32(127))).astype(np.float32)
    return out.reshape(shape)


def _is_one_row(x: te.Tensor) -> bool:
    return all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in x.shape[:2])


def matmul_tile16_te(spec: QuantSpec, act_dtype: str) -> Callable[..., te.Tensor]:
    """TE function (x (b, s, K), *weights in tile16 layout) -> (b, s, N / 16, 16) = x @ W.T.

    The output keeps the tile split (the caller reshapes it to (b, s, N), a free view), so the
    compute is an einsum over plain indices, which `pad_einsum` in the schedule needs. Three
    forms, each a block with its own `mlctrio.kind` for schedules.py:

    - "matmul_tile": float weights, or group-quantized ones dequantised by a "dequant" stage in
      the same layout (the schedule computes it per output tile, shared by every row);
    - "matmul_group" (group quantization, decode: one token per sequence, K a multiple of the
      group): the scale taken out of each group's sum,
      y[n] = sum_g scale[n, g] * (sum_{k in g} nibble[n, k] * x[k] - 7 * sum_{k in g} x[k]),
      which leaves 3 vector ops per 16 weights (shift, and, convert) shared by the rows of a
      block plus one FMA per row. A symbolic batch is padded to GROUP_ROWS rows ("x_pad",
      "matmul_unpad" around it) so the row block has no tail.
    """

    def _tile(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        b, s, in_features = x.shape
        k = te.reduce_axis((0, in_features), name="k")
        out_shape = (b, s, ws[0].shape[0], TILE)
        if not spec.is_group:
            (w,) = ws

            def _w(no: Any, kk: Any, ni: Any) -> Any:
                return w[no, kk, ni] if w.dtype == act_dtype else w[no, kk, ni].astype(act_dtype)

        else:
            deq = weight_fn(spec, list(ws), act_dtype, packed=True)
            wd = te.compute(
                (ws[0].shape[0], in_features, TILE),
                lambda no, kk, ni: deq(no * TILE + ni, kk),
                name="dequant",
                attrs={"mlctrio.kind": "dequant"},
            )

            def _w(no: Any, kk: Any, ni: Any) -> Any:
                return wd[no, kk, ni]

        return te.compute(
            out_shape,
            lambda i, j, no, ni: te.sum(x[i, j, k].astype(act_dtype) * _w(no, k, ni), axis=k),
            name="matmul",
            attrs={"mlctrio.kind": "matmul_tile"},
        )

    def _group(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
        b, s, in_features = x.shape
        g = spec.group_size
        groups = int(in_features) // g
        padded = not _is_one_row(x)
        if padded:  # decode (b, 1): rows padded to a multiple of GROUP_ROWS with zeros
            rows = (b + GROUP_ROWS - 1) // GROUP_ROWS * GROUP_ROWS
            x = te.compute(
                (rows, s, in_features),
                lambda i, j, k: tirx.if_then_else(i < b, x[i, j, k], tirx.const(0, x.dtype)),
                name="x_pad",
                attrs={"mlctrio.kind": "row_pad"},
            )
        kk = te.reduce_axis((0, g), name="kk")
        gsum = te.compute(
            (x.shape[0], s, q_weight.shape[0], TILE, groups),
            lambda i, j, no, ni, gi: te.sum(
                x[i, j, gi * g + kk]
                * _nibble(q_weight, no * TILE + ni, gi * g + kk, True).astype(act_dtype),
                axis=kk,
            ),
            name="group_dot",
            attrs={"mlctrio.kind": "group_dot"},
        )
        kx = te.reduce_axis((0, g), name="kx")
        xsum = te.compute(
            (x.shape[0], s, groups),
            lambda i, j, gi: te.sum(x[i, j, gi * g + kx], axis=kx),
            name="group_xsum",
            attrs={"mlctrio.kind": "group_xsum"},
        )
        gr = te.reduce_axis((0, groups), name="gr")
        zero = tirx.const(MAX_INT, act_dtype)
        y = te.compute(
            (x.shape[0], s, q_weight.shape[0], TILE),
            lambda i, j, no, ni: te.sum(
                q_scale[no, gr, ni].astype(act_dtype)
                * (gsum[i, j, no, ni, gr] - zero * xsum[i, j, gr]),
                axis=gr,
            ),
            name="matmul",
            attrs={"mlctrio.kind": "matmul_group"},
        )
        if not padded:
            return y
        return te.compute(
            (b, s, q_weight.shape[0], TILE),
            lambda i, j, no, ni: y[i, j, no, ni],
            name="matmul_unpad",
            attrs={"mlctrio.kind": "injective"},
        )

    def _f(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        in_features = int(x.shape[2])
        one_step = isinstance(x.shape[1], tirx.IntImm) and int(x.shape[1]) == 1
        if spec.is_group and one_step and in_features % spec.group_size == 0:
            return _group(x, *ws)
        return _tile(x, *ws)

    return _f


def embedding_te(
    spec: QuantSpec, act_dtype: str, hidden: int, packed: bool = False
) -> Callable[..., te.Tensor]:
    """TE function (ids (n,), *stored table) -> (n, hidden) rows of the (dequantised) table."""

    def _f(ids: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        w = weight_fn(spec, list(ws), act_dtype, packed)
        return te.compute(
            (ids.shape[0], hidden),
            lambda i, j: w(ids[i], j),
            name="embedding_take",
            attrs={"mlctrio.kind": "injective"},
        )

    return _f


def swiglu_te(intermediate: int) -> Callable[..., te.Tensor]:
    """TE SwiGLU of a fused gate_up (b, s, 2 I) -> (b, s, I) = silu(gate) * up, with the
    vectorisable fastmath.silu (relax's silu legalises to a per-element libm expf call)."""

    def _f(gate_up: te.Tensor) -> te.Tensor:
        b, s, _ = gate_up.shape
        return te.compute(
            (b, s, intermediate),
            lambda i, j, h: silu(gate_up[i, j, h]) * gate_up[i, j, intermediate + h],
            name="swiglu",
            attrs={"mlctrio.kind": "injective"},
        )

    return _f


def rms_norm_te(hidden: int, eps: float) -> Callable[..., te.Tensor]:
    """TE RMSNorm over the last axis of x (b, s, hidden): x * rsqrt(mean(x^2) + eps) * weight."""

    def _f(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
        b, s, _ = x.shape
        k = te.reduce_axis((0, hidden), name="k")
        sumsq = te.compute(
            (b, s),
            lambda i, j: te.sum(x[i, j, k] * x[i, j, k], axis=k),
            name="rms_sumsq",
            attrs={"mlctrio.kind": "rms_sumsq"},
        )
        inv_n = tirx.const(1.0 / hidden, x.dtype)
        return te.compute(
            (b, s, hidden),
            lambda i, j, h: (
                x[i, j, h] * tirx.rsqrt(sumsq[i, j] * inv_n + tirx.const(eps, x.dtype)) * weight[h]
            ),
            name="rms_norm",
            attrs={"mlctrio.kind": "rms_norm"},
        )

    return _f


# --------------------------------------------------------------------------------------------
# numpy: quantize HF weights on load, and dequantize for the reference forward.


def quantize_group_np(
    w: npt.NDArray[np.floating], spec: QuantSpec
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.floating]]:
    """Quantize a 2-D weight (rows, cols) along cols -> (q_weight (rows, cols/8), q_scale)."""
    rows, cols = w.shape
    g = spec.group_size
    groups = -(-cols // g)
    # Like mlc-llm, a partial last group is padded (with zeros): q_weight has groups * g / 8 words.
    wf = np.zeros((rows, groups * g), np.float32)
    wf[:, :cols] = w
    wf = wf.reshape(rows, groups, g)
    scale = (np.abs(wf).max(axis=2) / MAX_INT).astype(spec.scale_dtype)
    # Quantize against the scale as stored (possibly rounded to f16) so that dequantization is
    # exactly the value the kernel computes; an all-zero group gets scale 0 and nibble 7.
    s32 = scale.astype(np.float32)[:, :, None]
    safe = np.where(s32 == 0, 1.0, s32)
    q = np.clip(np.round(wf / safe) + MAX_INT, 0, 2 * MAX_INT).astype(np.uint32)
    q = q.reshape(rows, groups * g // ELEMS_PER_WORD, ELEMS_PER_WORD)
    shifts = (np.arange(ELEMS_PER_WORD, dtype=np.uint32) * NUM_BITS)[None, None, :]
    packed = np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)
    return packed, scale


def dequantize_group_np(
    q_weight: npt.NDArray[np.uint32],
    q_scale: npt.NDArray[np.floating],
    group_size: int = 32,
    cols: int | None = None,
) -> npt.NDArray[np.float32]:
    """Inverse of `quantize_group_np` (up to rounding): float32 (rows, cols), padding cut."""
    rows, words = q_weight.shape
    shifts = (np.arange(ELEMS_PER_WORD, dtype=np.uint32) * NUM_BITS)[None, None, :]
    nib = (q_weight[:, :, None] >> shifts) & np.uint32(0xF)
    vals = nib.reshape(rows, words * ELEMS_PER_WORD).astype(np.float32) - MAX_INT
    scale = np.repeat(q_scale.astype(np.float32), group_size, axis=1)
    out = (vals * scale).astype(np.float32)
    return out if cols is None else out[:, :cols]


def quantize_weight_np(w: npt.NDArray[np.floating], spec: QuantSpec) -> list[npt.NDArray]:
    """Stored arrays of a linear/embedding weight under `spec`: [weight] or [q_weight, q_scale]."""
    if spec.is_group:
        return list(quantize_group_np(w, spec))
    return [np.ascontiguousarray(w, dtype=spec.weight_dtype)]


def effective_weight_np(
    stored: list[npt.NDArray], spec: QuantSpec, cols: int | None = None
) -> npt.NDArray[np.float32]:
    """The float32 weight the compiled kernel effectively multiplies by (for the reference)."""
    if spec.is_group:
        return dequantize_group_np(stored[0], stored[1], spec.group_size, cols)
    return stored[0].astype(np.float32)
