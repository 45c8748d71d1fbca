"""TE compute definitions of the model's ops: dequantising matmuls, embedding, SwiGLU and GeGLU,
RMSNorm, logit soft-capping.

Every op is a `te.compute` whose blocks carry an `mlctrio.kind` attribute, which the CPU schedules
in schedules.py look for. Dequantisation is written inside the matmul's compute because a
separate dequantize op is not fused into a matmul by Relax and would materialise the full f32
weight. All activations stay float32 on the CPU (x86 without native fp16 computes fp16 slowly);
only the stored weights shrink. The storage formats are quantization.QuantSpec's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import te, tirx

from mlctrio.models.fastmath import gelu_tanh, silu, tanh
from mlctrio.models.quantization import GROUP_ROWS, TILE, QuantSpec

WeightFn = Callable[[Any, Any], Any]


def _at(t: te.Tensor, n: Any, col: Any, packed: bool) -> Any:
    """Element (row n, column col) of a stored (out, x) tensor, in MLC or tile16 layout."""
    return t[n // TILE, col, n % TILE] if packed else t[n, col]


def _stored(q_weight: te.Tensor, n: Any, k: Any, spec: QuantSpec, packed: bool) -> Any:
    """The stored unsigned value (uint32) of weight (n, k): a nibble (4 bits, word k // 8, bits
    4 * (k % 8)) or a byte (8 bits, word 2 * (k // 8) + k % 2, byte (k % 8) // 2)."""
    if spec.bits == 4:
        word = _at(q_weight, n, k // 8, packed)
        shift = (k % 8 * 4).astype("uint32")
        mask = 0xF
    else:
        word = _at(q_weight, n, k // 8 * 2 + k % 2, packed)
        shift = (k % 8 // 2 * 8).astype("uint32")
        mask = 0xFF
    return tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(mask, "uint32"))


def _bf16(bits: Any) -> Any:
    """bfloat16 bits (uint16) -> float32: the top half of the float's bits."""
    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def weight_fn(
    spec: QuantSpec, tensors: list[te.Tensor], act_dtype: str, packed: bool = False
) -> WeightFn:
    """Return W(n, k) as an expression of the stored tensors, in `act_dtype`."""
    if spec.kind == "bf16":
        (w,) = tensors
        return lambda n, k: _bf16(_at(w, n, k, packed)).astype(act_dtype)
    if not spec.is_group:
        (w,) = tensors
        if w.dtype == act_dtype:
            return lambda n, k: _at(w, n, k, packed)
        return lambda n, k: _at(w, n, k, packed).astype(act_dtype)
    q_weight, q_scale = tensors
    group, per = spec.group_size, spec.scales_per_group

    def _deq(n: Any, k: Any) -> Any:
        value = _stored(q_weight, n, k, spec, packed).astype(act_dtype)
        scale = _at(q_scale, n, k // group * per, packed).astype(act_dtype)
        if spec.has_min:
            return value * scale + _at(q_scale, n, k // group * 2 + 1, packed).astype(act_dtype)
        return (value - tirx.const(spec.zero, act_dtype)) * scale

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
        if cpu_layout and spec.is_group and in_features % 8 == 0:
            return _staged(x, *ws)
        return _simple(x, *ws)

    return _f


def _is_one_row(x: te.Tensor) -> bool:
    return all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in x.shape[:2])


def matmul_tile16_te(
    spec: QuantSpec, act_dtype: str, group_rows: int = GROUP_ROWS
) -> Callable[..., te.Tensor]:
    """TE function (x (b, s, K), *weights in tile16 layout) -> (b, s, N / 16, 16) = x @ W.T.

    The output keeps the tile split (the caller reshapes it to (b, s, N), a free view), so the
    compute is an einsum over plain indices, which `pad_einsum` in the schedule needs. Three
    forms, each a block with its own `mlctrio.kind` for schedules.py:

    - "matmul_tile": float weights, or group-quantized ones dequantised by a "dequant" stage in
      the same layout (the schedule computes it per output tile, shared by every row);
    - "matmul_group" (group quantization, decode: one token per sequence, K a multiple of the
      group): the scale taken out of each group's sum,
      y[n] = sum_g scale[n, g] * (sum_{k in g} stored[n, k] * x[k] - zero * sum_{k in g} x[k])
      (or + min[n, g] * sum_{k in g} x[k] for formats with a min),
      which leaves 3 vector ops per 16 weights (shift, and, convert) shared by the rows of a
      block plus one FMA per row. A symbolic batch is padded to `group_rows` rows ("x_pad",
      "matmul_unpad" around it) so the row block has no tail; the block carries that row
      count ("mlctrio.group_rows") for the schedule.
    """

    def _tile(x: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        b, s, in_features = x.shape
        k = te.reduce_axis((0, in_features), name="k")
        out_shape = (b, s, ws[0].shape[0], TILE)
        if not spec.is_group:
            (w,) = ws

            def _w(no: Any, kk: Any, ni: Any) -> Any:
                if spec.kind == "bf16":
                    return _bf16(w[no, kk, ni]).astype(act_dtype)
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
        if padded:  # decode (b, 1): rows padded to a multiple of group_rows with zeros
            rows = (b + group_rows - 1) // group_rows * group_rows
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
                * _stored(q_weight, no * TILE + ni, gi * g + kk, spec, True).astype(act_dtype),
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
        zero = tirx.const(spec.zero, act_dtype)

        def _term(i: Any, j: Any, no: Any, ni: Any) -> Any:
            scale = q_scale[no, gr * spec.scales_per_group, ni].astype(act_dtype)
            if spec.has_min:  # sum_k (q s + m) x_k = s sum_k q x_k + m sum_k x_k
                low = q_scale[no, gr * 2 + 1, ni].astype(act_dtype)
                return scale * gsum[i, j, no, ni, gr] + low * xsum[i, j, gr]
            return scale * (gsum[i, j, no, ni, gr] - zero * xsum[i, j, gr])

        y = te.compute(
            (x.shape[0], s, q_weight.shape[0], TILE),
            lambda i, j, no, ni: te.sum(_term(i, j, no, ni), axis=gr),
            name="matmul",
            attrs={"mlctrio.kind": "matmul_group", "mlctrio.group_rows": group_rows},
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
    spec: QuantSpec, act_dtype: str, hidden: int, packed: bool = False, scale: float = 1.0
) -> Callable[..., te.Tensor]:
    """TE function (ids (n,), *stored table) -> (n, hidden) rows of the (dequantised) table,
    times `scale` unless it is 1 (Gemma scales its embedding by sqrt(hidden), in the act dtype)."""

    def _f(ids: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        w = weight_fn(spec, list(ws), act_dtype, packed)
        if scale != 1.0:
            factor = tirx.const(scale, act_dtype)
            return te.compute(
                (ids.shape[0], hidden),
                lambda i, j: w(ids[i], j) * factor,
                name="embedding_take",
                attrs={"mlctrio.kind": "injective"},
            )
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
    return _gated_te(intermediate, silu, "swiglu")


def geglu_te(intermediate: int) -> Callable[..., te.Tensor]:
    """TE GeGLU (b, s, 2 I) -> (b, s, I) = gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh),
    with the vectorisable fastmath.gelu_tanh."""
    return _gated_te(intermediate, gelu_tanh, "geglu")


def _gated_te(intermediate: int, act: Callable[[Any], Any], name: str) -> Callable[..., te.Tensor]:
    def _f(gate_up: te.Tensor) -> te.Tensor:
        b, s, _ = gate_up.shape
        return te.compute(
            (b, s, intermediate),
            lambda i, j, h: act(gate_up[i, j, h]) * gate_up[i, j, intermediate + h],
            name=name,
            attrs={"mlctrio.kind": "injective"},
        )

    return _f


def softcap_te(cap: float) -> Callable[..., te.Tensor]:
    """TE logit soft-capping of (b, s, v): cap * tanh(x / cap)."""

    def _f(x: te.Tensor) -> te.Tensor:
        c = tirx.const(cap, x.dtype)
        return te.compute(
            x.shape,
            lambda i, j, v: c * tanh(x[i, j, v] / c),
            name="softcap",
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
