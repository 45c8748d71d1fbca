"""Mixture-of-experts kernels: routing (hand-written TIR) and the expert matmuls (TE).

Rules:
- Expert weights are stacked per layer, (E, N, K) in any QuantSpec storage (q_weight / q_scale
  (E, N, K * bits / 32) / (E, N, groups) for group formats; on the CPU, where the widths
  tile, each expert's in the tile16 layout, (E, N / 16, x, 16)), and read as W[id, n, k] with
  the data-dependent expert id of each (token, slot): a step reads only its chosen experts'
  weights (decode at batch 1: top_k of E). Dequantisation is te_ops.weight_fn's / _stored's,
  over one expert's slice (`_ExpertSlice`).
- Routing follows transformers: softmax over all experts in float32, top-k of the
  probabilities (ties to the lower expert id), renormalised to sum 1 when asked.
- Every TE block carries an `mlctrio.kind` (schedule_moe.py schedules the expert matmuls): an
  expert matmul is "moe_matmul" (float weights; group formats dequantised per tile, a "dequant"
  stage) or, for group formats in the tile16 layout, "moe_group" with its "group_dot" and
  "group_xsum" stages; the gated activation is "injective".
- The routing kernel is scheduled by hand (tokens in parallel, `tirx.is_scheduled`): per token
  it is O(E * top_k) scalar work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tvm import te, tirx
from tvm.script import tirx as T

from mlctrio.models.fastmath import silu
from mlctrio.models.quantization import TILE, QuantSpec
from mlctrio.models.te_ops import _stored, weight_fn


@functools.cache
def route_func(num_experts: int, top_k: int, normalize: bool) -> tirx.PrimFunc:
    """(logits (n, E) f32) -> (weights (n, top_k) f32, ids (n, top_k) int32): softmax over the
    E experts, the top_k probabilities in descending order (the lower id first among equal
    ones), divided by their sum when `normalize`."""
    E, K = num_experts, top_k

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def moe_route(var_logits: T.handle, var_w: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        logits = T.match_buffer(var_logits, (n, E), "float32")
        w = T.match_buffer(var_w, (n, K), "float32")
        ids = T.match_buffer(var_ids, (n, K), "int32")
        for t in T.parallel(n):
            with T.sblock("route"):
                T.reads()
                T.writes()
                p = T.sblock_alloc_buffer((E,), "float32")
                acc = T.sblock_alloc_buffer((2,), "float32")
                best = T.sblock_alloc_buffer((1,), "int32")
                acc[0] = logits[t, 0]
                for e in T.serial(E):
                    acc[0] = T.max(acc[0], logits[t, e])
                acc[1] = T.float32(0)
                for e in T.serial(E):
                    p[e] = T.exp(logits[t, e] - acc[0])
                    acc[1] = acc[1] + p[e]
                acc[1] = T.float32(1) / acc[1]
                for e in T.serial(E):
                    p[e] = p[e] * acc[1]
                for j in T.serial(K):
                    # Probabilities are >= 0; a chosen expert's is set to -1.
                    acc[0] = T.float32(-1)
                    best[0] = 0
                    for e in T.serial(E):
                        if p[e] > acc[0]:
                            acc[0] = p[e]
                            best[0] = e
                    ids[t, j] = best[0]
                    w[t, j] = acc[0]
                    p[best[0]] = T.float32(-1)
                if normalize:
                    acc[1] = T.float32(0)
                    for j in T.serial(K):
                        acc[1] = acc[1] + w[t, j]
                    for j in T.serial(K):
                        w[t, j] = w[t, j] / acc[1]
    # fmt: on
    return moe_route


class _ExpertSlice:
    """One expert's (N, x) slice of a stacked (E, N, x) tensor, indexable as te_ops.weight_fn
    indexes a plain weight: slice[n, col] = stacked[expert, n, col]."""

    def __init__(self, stacked: te.Tensor, expert: Any):
        self.stacked, self.expert, self.dtype = stacked, expert, stacked.dtype

    def __getitem__(self, index: tuple[Any, Any]) -> Any:
        return self.stacked[(self.expert, *index)]


def _expert_weight(spec: QuantSpec, ws: tuple[te.Tensor, ...], act_dtype: str) -> Callable:
    """W(e, n, k) in `act_dtype`, dequantised from the stacked stored tensors."""

    def _w(e: Any, n: Any, k: Any) -> Any:
        return weight_fn(spec, [_ExpertSlice(t, e) for t in ws], act_dtype)(n, k)

    return _w


def expert_matmul_te(
    spec: QuantSpec, act_dtype: str, out_features: int, combine: bool, staged: bool
) -> Callable[..., te.Tensor]:
    """TE function (x, ids (T, top_k) int32, *stacked weights) -> the chosen experts' x @ W.T:

    - `combine=False` (gate_up): x (T, K) -> (T, top_k, N), y[t, j] = x[t] @ W[ids[t, j]].T;
    - `combine=True` (down): x (T, top_k, K) -> (T, N), y[t] = sum_j x[t, j] @ W[ids[t, j]].T
      (the routing weight is already in x: moe_act_te).

    With `staged` (the CPU, group formats, K % 8 == 0) a "dequant" stage holds the chosen
    experts' float weights; schedule_moe.py computes it per output tile, never whole."""

    def _f(x: te.Tensor, ids: te.Tensor, *ws: te.Tensor) -> te.Tensor:
        in_features = int(x.shape[-1])
        rows, top_k = ids.shape
        w = _expert_weight(spec, ws, act_dtype)

        def expert(t: Any, j: Any) -> Any:
            return ids[t, j].astype("int64")

        wd = None
        if staged:
            wd = te.compute(
                (rows, top_k, out_features, in_features),
                lambda t, j, n, k: w(expert(t, j), n, k),
                name="dequant",
                attrs={"mlctrio.kind": "dequant"},
            )

        def weight(t: Any, j: Any, n: Any, k: Any) -> Any:
            return wd[t, j, n, k] if wd is not None else w(expert(t, j), n, k)

        k = te.reduce_axis((0, in_features), name="k")
        if not combine:
            return te.compute(
                (rows, top_k, out_features),
                lambda t, j, n: te.sum(x[t, k].astype(act_dtype) * weight(t, j, n, k), axis=k),
                name="moe_matmul",
                attrs={"mlctrio.kind": "moe_matmul"},
            )
        jr = te.reduce_axis((0, top_k), name="j")
        return te.compute(
            (rows, out_features),
            lambda t, n: te.sum(x[t, jr, k] * weight(t, jr, n, k), axis=[jr, k]),
            name="moe_matmul",
            attrs={"mlctrio.kind": "moe_matmul"},
        )

    return _f


def expert_group_matmul_te(spec: QuantSpec, act_dtype: str, combine: bool) -> Callable:
    """expert_matmul_te for group-quantized experts in the tile16 layout (q_weight / q_scale
    (E, N / 16, x, 16), quantization.pack_tile_np per expert), K a multiple of the group: the
    group scale taken out of each group's sum, as te_ops.matmul_tile16_te's "matmul_group",
    y[n] = sum_g scale[e, n, g] * (sum_{k in g} stored[e, n, k] * x[k] - zero * sum_{k in g} x[k])
    (or + min[e, n, g] * sum_{k in g} x[k]). Output (T, top_k, N / 16, 16), or (T, N / 16, 16)
    with `combine`; blocks "group_xsum", "group_dot", "moe_group" (schedule_moe.py)."""
    per, zero = spec.scales_per_group, tirx.const(spec.zero, act_dtype)

    def _f(x: te.Tensor, ids: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
        rows, top_k = ids.shape
        tiles, groups = q_weight.shape[1], int(x.shape[-1]) // spec.group_size
        xsum, gdot = _group_sums(spec, act_dtype, x, ids, q_weight, combine)
        gr = te.reduce_axis((0, groups), name="gr")

        def _term(t: Any, j: Any, no: Any, ni: Any) -> Any:
            e = ids[t, j].astype("int64")
            scale = q_scale[e, no, gr * per, ni].astype(act_dtype)
            xsum_g = xsum[t, j, gr] if combine else xsum[t, gr]
            if spec.has_min:
                low = q_scale[e, no, gr * 2 + 1, ni].astype(act_dtype)
                return scale * gdot[t, j, no, ni, gr] + low * xsum_g
            return scale * (gdot[t, j, no, ni, gr] - zero * xsum_g)

        attrs = {"mlctrio.kind": "moe_group"}
        if not combine:
            return te.compute(
                (rows, top_k, tiles, TILE),
                lambda t, j, no, ni: te.sum(_term(t, j, no, ni), axis=gr),
                name="moe_matmul",
                attrs=attrs,
            )
        jr = te.reduce_axis((0, top_k), name="j")
        return te.compute(
            (rows, tiles, TILE),
            lambda t, no, ni: te.sum(_term(t, jr, no, ni), axis=[jr, gr]),
            name="moe_matmul",
            attrs=attrs,
        )

    return _f


def _group_sums(
    spec: QuantSpec,
    act_dtype: str,
    x: te.Tensor,
    ids: te.Tensor,
    q_weight: te.Tensor,
    combine: bool,
) -> tuple[te.Tensor, te.Tensor]:
    """expert_group_matmul_te's stages: the inputs' sum per group, (T, groups) or with `combine`
    (T, top_k, groups), and the dot of each group of inputs with the stored integers of the
    chosen expert's 16 features of a tile, (T, top_k, N / 16, 16, groups)."""
    g = spec.group_size
    rows, top_k = ids.shape
    tiles, groups = q_weight.shape[1], int(x.shape[-1]) // g
    kx = te.reduce_axis((0, g), name="kx")
    attrs = {"mlctrio.kind": "group_xsum"}
    if combine:
        xsum = te.compute(
            (rows, top_k, groups),
            lambda t, j, gi: te.sum(x[t, j, gi * g + kx], axis=kx),
            name="group_xsum",
            attrs=attrs,
        )
    else:
        xsum = te.compute(
            (rows, groups),
            lambda t, gi: te.sum(x[t, gi * g + kx], axis=kx),
            name="group_xsum",
            attrs=attrs,
        )
    kk = te.reduce_axis((0, g), name="kk")

    def _dot(t: Any, j: Any, no: Any, ni: Any, gi: Any) -> Any:
        w = _ExpertSlice(q_weight, ids[t, j].astype("int64"))
        stored = _stored(w, no * TILE + ni, gi * g + kk, spec, True).astype(act_dtype)
        xk = x[t, j, gi * g + kk] if combine else x[t, gi * g + kk]
        return te.sum(xk * stored, axis=kk)

    gdot = te.compute(
        (rows, top_k, tiles, TILE, groups),
        _dot,
        name="group_dot",
        attrs={"mlctrio.kind": "group_dot"},
    )
    return xsum, gdot


def moe_act_te(intermediate: int) -> Callable[..., te.Tensor]:
    """TE (gate_up (T, top_k, 2 I), weights (T, top_k)) -> (T, top_k, I) =
    silu(gate) * up * weight: each expert's SwiGLU, scaled by its routing weight."""

    def _f(gate_up: te.Tensor, weights: te.Tensor) -> te.Tensor:
        rows, top_k, _ = gate_up.shape
        return te.compute(
            (rows, top_k, intermediate),
            lambda t, j, i: (
                silu(gate_up[t, j, i]) * gate_up[t, j, intermediate + i] * weights[t, j]
            ),
            name="moe_act",
            attrs={"mlctrio.kind": "injective"},
        )

    return _f
