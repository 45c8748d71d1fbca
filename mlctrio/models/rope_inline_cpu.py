"""Inline RoPE for the CPU attention kernels' keys: cos/sin per page by angle addition.

When the KV cache rotates keys at attention time (TVM's inline RoPE mode, which its
sliding-window mode forces; attention_cpu.py), every kernel task rotates every key it reads.
TVM's `_rope` evaluates a power, a cosine and a sine per element, which made sliding-mode
decode several times slower (docs/discussion/0011). Here, per task, each frequency's angle step
is computed once (`setup`), and per page of P columns the cos/sin of the first position only
(`page_trig`); the next positions follow by angle addition, cos(a + g) = cos a cos g -
sin a sin g (15 steps: relative error ~1e-6, as float32 angles of large positions already
have). Positions jump inside a page only where the cache's slid layout puts the window after
its sinks (column `off`): the recurrence restarts there.

Rules:
- Only for frequency functions linear in the position (TVM's default and llama3 scaling), whose
  per-dim angle at position 1 is the step; `linear_rope` says which. Others keep `_rope`.
- Rotation pairs dims d and d + D/2 (`_rope`'s, NeoX's): out[d] = x[d] c - x[d + D/2] s,
  out[d + D/2] = x[d + D/2] c + x[d] s.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T


def linear_rope(rope_scaling: dict[str, Any]) -> bool:
    """Whether RoPE's angle is position x a per-dim frequency (angle addition applies)."""
    return rope_scaling.get("rope_type", "default") in ("default", "llama3")


def _step_angle(d: Any, D: int, theta: Any, rope_scaling: dict[str, Any]) -> Any:
    """The angle of dim d at position 1: what `_rope`'s frequency function computes."""
    _, _, var_map = switch_rope_freq_func(rope_scaling)(T.float32(1), d, D, theta, "float32")
    expr = next(iter(var_map))  # the angle variable; the rest are its common subexpressions
    for var, value in var_map.items():
        expr = tirx.Let(var, value, expr)
    return expr


def trig_macros(P: int, D: int, rope_scaling: dict[str, Any]) -> tuple[Any, Any]:
    """(setup, page_trig) TVMScript macros; buffers: gf/cstep/sstep (D/2,), cs/sn (P, D/2),
    kpos (1,) int32 scratch (a position through a buffer: a loop-variable position inside a float
    Let fails LLVM codegen in T.parallel)."""
    H = D // 2

    # fmt: off
    @T.macro
    def setup(gf, cstep, sstep, rope_theta, rope_scale):
        for d in T.serial(H):
            gf[d] = _step_angle(d, D, rope_theta, rope_scaling)
            cstep[d] = T.cos(gf[d] * rope_scale)
            sstep[d] = T.sin(gf[d] * rope_scale)

    @T.macro
    def page_trig(cs, sn, gf, cstep, sstep, kpos, kpo, col0, off, snk, rope_scale):
        # column c's position: kpo + c among the sinks (c < snk), kpo + c - off + snk after off
        for j in T.serial(P):
            if tirx.any(j == 0, col0 + j == off):
                kpos[0] = kpo + T.if_then_else(col0 + j < snk, col0 + j, col0 + j - off + snk)
                for d in T.serial(H):
                    cs[j, d] = T.cos(T.Cast("float32", kpos[0]) * rope_scale * gf[d])
                    sn[j, d] = T.sin(T.Cast("float32", kpos[0]) * rope_scale * gf[d])
            else:
                for d in T.vectorized(H):
                    cs[j, d] = cs[j - 1, d] * cstep[d] - sn[j - 1, d] * sstep[d]
                    sn[j, d] = sn[j - 1, d] * cstep[d] + cs[j - 1, d] * sstep[d]
    # fmt: on
    return setup, page_trig
