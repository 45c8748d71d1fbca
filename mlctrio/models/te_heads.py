"""TE ops over the heads of a fused qkv viewed as rows (b, s * heads, d): q/k RMSNorm and RoPE.

Row r of a token holds head `r % heads`: heads [0, h_q) are q, [h_q, h_q + h_kv) are k, the rest
v. Viewing (b, s, heads, d) as (b, s * heads, d) is a free reshape and gives these ops the
three-loop shape schedules.py's rms_norm and injective rules expect (rows in parallel, d
vectorised). Both ops compute in float32, as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import te, tirx


def head_rms_norm_te(h_q: int, h_kv: int, d: int, eps: float) -> Callable[..., te.Tensor]:
    """q heads * rsqrt(mean(x^2) + eps) * q_norm, k heads likewise with k_norm, v unchanged."""
    heads = h_q + 2 * h_kv

    def _f(x: te.Tensor, wq: te.Tensor, wk: te.Tensor) -> te.Tensor:
        b, rows, _ = x.shape
        k = te.reduce_axis((0, d), name="k")
        sumsq = te.compute(
            (b, rows),
            lambda i, r: te.sum(x[i, r, k] * x[i, r, k], axis=k),
            name="head_sumsq",
            attrs={"mlctrio.kind": "rms_sumsq"},
        )
        inv_n = tirx.const(1.0 / d, x.dtype)

        def _norm(i: Any, r: Any, h: Any) -> Any:
            head = r % heads
            scale = tirx.rsqrt(sumsq[i, r] * inv_n + tirx.const(eps, x.dtype))
            w = tirx.Select(head < h_q, wq[h], wk[h])
            return tirx.Select(head < h_q + h_kv, x[i, r, h] * scale * w, x[i, r, h])

        return te.compute(
            (b, rows, d), _norm, name="head_rms_norm", attrs={"mlctrio.kind": "rms_norm"}
        )

    return _f


def rope_te(
    h_q: int, h_kv: int, d: int, rotary_dim: int | None = None, scale: float = 1.0
) -> Callable[..., te.Tensor]:
    """Rotate-half RoPE of the q and k rows at `positions` (b * s,) with `inv_freq` (rd / 2,)
    over the first rd = `rotary_dim` (default d) dims; dims from rd on pass unchanged:
    out[h] = x[h] cos(p f) - x[h + rd/2] sin(p f) for h < rd/2, x[h] cos + x[h - rd/2] sin
    above. With `scale` (LongRoPE's attention factor) cos and sin are multiplied by it first,
    as transformers does."""
    heads, rd = h_q + 2 * h_kv, rotary_dim or d
    half = rd // 2

    def _f(x: te.Tensor, positions: te.Tensor, inv_freq: te.Tensor) -> te.Tensor:
        b, rows, _ = x.shape
        per_seq = rows // heads  # tokens per sequence (s)

        def _rot(i: Any, r: Any, h: Any) -> Any:
            pos = positions[i * per_seq + r // heads].astype("float32")
            angle = pos * inv_freq[h % half]
            partner = x[i, r, (h + half) % rd]  # the other half of the rotated pair
            other = tirx.Select(h < half, -partner, partner)
            cos, sin = tirx.cos(angle), tirx.sin(angle)
            if scale != 1.0:
                cos, sin = cos * tirx.const(scale, "float32"), sin * tirx.const(scale, "float32")
            rotated = x[i, r, h] * cos + other * sin
            rotates = r % heads < h_q + h_kv
            if rd < d:
                rotates = tirx.all(rotates, h < rd)
            return tirx.Select(rotates, rotated, x[i, r, h])

        return te.compute((b, rows, d), _rot, name="rope", attrs={"mlctrio.kind": "injective"})

    return _f
