"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE in `tvm.relax.frontend.nn`.

Rules:
- One module replaces LlamaMLP in an MoE layer (models/llama.py picks it by
  `LlamaConfig.is_moe_layer`). Its parameters, named as mlc-llm's Qwen3-MoE names them:
  `mlp.gate.weight` (the router, (E, H), always float32), `mlp.moe_gate_up_proj.*` (E, 2 I, H)
  with each expert's gate rows then its up rows, and `mlp.moe_down_proj.*` (E, H, I), in the
  layer's QuantSpec storage (weights.py stacks the experts of an HF checkpoint).
- Router logits are a float32 linear (QLinear, its CPU layout like any other); routing is
  te_moe.route_func. Every expert path reads only the experts the step routes to.
- A step of one token (the static-shape `decode` function) gathers per (token, slot)
  (`experts_per_token`, te_moe.expert_matmul_te: the stacked weights indexed by the chosen ids),
  which reads exactly the top_k chosen experts.
- A step of several tokens (prefill, batched decode, verify) on the CPU takes the grouped GEMM
  (`grouped_experts`, moe_grouped.py / moe_grouped_float.py): the (token, slot) rows sorted by
  expert, every expert's weights read and dequantised once for all of its rows, SwiGLU and the
  routing weight fused into gate_up, the slots summed in down. Measured on one layer of
  Qwen3-30B-A3B's shape (128 experts of 768, top 8; one thread, the two paths in turns) it
  pays from two tokens on: q4f32_1 equal at 1 token, 8% faster at 2, 21% at 8, 2.5x at 128;
  q0f32 equal at 1, 5% at 2, 1.3x at 8, 2.1x at 32. So the shape alone chooses (a runtime
  switch would buy nothing); `per_token_experts()` builds the old path for comparison.
- The grouped GEMM needs float experts ((E, N, K)) or group formats in the tile16 layout with
  I % 16 == 0 (a gate tile paired with its up tile), and float32 activations; other layouts
  keep the per-token path at every batch.
- Group-quantized experts always take float activations (no int8 path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mlctrio.models import moe_grouped, moe_grouped_float
from mlctrio.models.layers import LAYOUT_ATTR, QLinear
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import QUANTIZATIONS, TILE, TILE16, QuantSpec, Scheme
from mlctrio.models.te_moe import (
    expert_group_matmul_te,
    expert_matmul_te,
    moe_act_te,
    route_func,
)

ROUTER_SPEC = QUANTIZATIONS["q0f32"]
_use_grouped = True  # per_token_experts() turns the grouped GEMM off (benchmarks)

# pylint: disable=missing-docstring,invalid-name


class ExpertLinear(nn.Module):
    """E stacked linears (in_f -> out_f), stored as QLinear stores one, with a leading E axis."""

    def __init__(self, experts: int, in_f: int, out_f: int, spec: QuantSpec, act_dtype: str):
        self.spec, self.act_dtype, self.in_f, self.out_f = spec, act_dtype, in_f, out_f
        self.cpu_layout = self.tile16 = False  # set by use_cpu_layout
        if spec.is_group:
            groups = -(-in_f // spec.group_size)
            words = groups * spec.group_size // spec.elems_per_word
            self.q_weight = nn.Parameter((experts, out_f, words), "uint32")
            self.q_scale = nn.Parameter(
                (experts, out_f, groups * spec.scales_per_group), spec.scale_dtype
            )
        else:
            self.weight = nn.Parameter((experts, out_f, in_f), spec.weight_dtype)

    def stored(self) -> list[nn.Parameter]:
        return [self.q_weight, self.q_scale] if self.spec.is_group else [self.weight]

    def use_cpu_layout(self) -> None:
        """CPU kernels: group-quantized experts whose features split into tiles of 16 and whose
        inputs into whole groups take the tile16 layout (te_moe.expert_group_matmul_te); other
        group-quantized ones dequantise per output tile; float ones stay (E, N, K)."""
        self.cpu_layout = True
        s = self.spec
        if not s.is_group or self.out_f % TILE or self.in_f % s.group_size:
            return
        self.tile16 = True
        for name in ("q_weight", "q_scale"):
            old: nn.Parameter = getattr(self, name)
            experts, out_f, cols = (int(d) for d in old.shape)
            new = nn.Parameter((experts, out_f // TILE, cols, TILE), old.dtype)
            new.attrs[LAYOUT_ATTR] = TILE16
            setattr(self, name, new)

    def grouped_kernels(self) -> Any | None:
        """The module of grouped kernels for these weights (moe_grouped for tile16 group
        formats, moe_grouped_float for float (E, N, K)), or None: the per-token path only."""
        if not self.cpu_layout or self.act_dtype != "float32":
            return None
        if self.tile16:
            return moe_grouped
        return None if self.spec.is_group else moe_grouped_float

    def forward(self, x: Tensor, ids: Tensor, combine: bool) -> Tensor:
        if self.tile16:
            f = expert_group_matmul_te(self.spec, self.act_dtype, combine)
            y = op.tensor_expr_op(f, "moe_matmul", [x, ids, *self.stored()])
            rows, top_k = ids.shape
            return op.reshape(y, (rows, self.out_f) if combine else (rows, top_k, self.out_f))
        staged = self.cpu_layout and self.spec.is_group and self.in_f % 8 == 0
        f = expert_matmul_te(self.spec, self.act_dtype, self.out_f, combine, staged)
        return op.tensor_expr_op(f, "moe_matmul", [x, ids, *self.stored()])


class MoEMLP(nn.Module):
    """x -> sum over the top_k experts e of weight_e * down_e(silu(gate_e x) * up_e x)."""

    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str):
        if not c.num_experts or not c.num_experts_per_tok or not c.moe_intermediate_size:
            raise ValueError("an MoE layer needs num_experts, num_experts_per_tok, moe sizes")
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.experts, self.top_k, self.normalize = e, c.num_experts_per_tok, bool(c.norm_topk_prob)
        self.hidden, self.intermediate = h, i
        self.gate = QLinear(h, e, ROUTER_SPEC, act_dtype)
        self.grouped = False  # the grouped GEMM for steps of several tokens (use_cpu_layout)
        gate_up_spec = scheme.spec_for(f"{prefix}.moe_gate_up_proj")
        self.moe_gate_up_proj = ExpertLinear(e, h, 2 * i, gate_up_spec, act_dtype)
        down_spec = scheme.spec_for(f"{prefix}.moe_down_proj")
        self.moe_down_proj = ExpertLinear(e, i, h, down_spec, act_dtype)

    def use_cpu_layout(self) -> None:
        """The CPU kernels and layouts of the experts (ExpertLinear.use_cpu_layout), and the
        grouped GEMM for steps of several tokens where both projections have one."""
        self.moe_gate_up_proj.use_cpu_layout()
        self.moe_down_proj.use_cpu_layout()
        gate_up = self.moe_gate_up_proj.grouped_kernels()
        paired = gate_up is not moe_grouped or self.intermediate % TILE == 0
        kernels = (gate_up, self.moe_down_proj.grouped_kernels())
        self.grouped = _use_grouped and paired and None not in kernels

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        rows = op.reshape(x, (b * s, self.hidden))
        logits = op.reshape(self.gate(x), (b * s, self.experts))
        n = logits.shape[0]
        weights, ids = op.tensor_ir_op(
            route_func(self.experts, self.top_k, self.normalize),
            "moe_route",
            [logits],
            [
                Tensor.placeholder((n, self.top_k), "float32"),
                Tensor.placeholder((n, self.top_k), "int32"),
            ],
        )
        if self.grouped and not _one_token(b, s):
            out = self.grouped_experts(rows, weights, ids)
        else:
            out = self.experts_per_token(rows, weights, ids)
        return op.reshape(out, (b, s, self.hidden))

    def experts_per_token(self, rows: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """(rows (n, H), routing weights and ids (n, top_k)) -> (n, H): each (token, slot)
        multiplied by its expert's weights (te_moe)."""
        gate_up = self.moe_gate_up_proj(rows, ids, combine=False)
        act = op.tensor_expr_op(moe_act_te(self.intermediate), "moe_act", [gate_up, weights])
        return self.moe_down_proj(act, ids, combine=True)

    def grouped_experts(self, rows: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """experts_per_token as a grouped GEMM (moe_grouped.py): the rows sorted by expert,
        gate_up + SwiGLU, down; needs `self.grouped`."""
        e, k, h, i = self.experts, self.top_k, self.hidden, self.intermediate
        n = ids.shape[0]
        indptr, order = op.tensor_ir_op(
            moe_grouped.sort_func(e, k),
            "moe_sort",
            [ids],
            [Tensor.placeholder((e + 1,), "int32"), Tensor.placeholder((n * k,), "int32")],
        )
        gu, dn = self.moe_gate_up_proj, self.moe_down_proj
        gu_kernels, dn_kernels = gu.grouped_kernels(), dn.grouped_kernels()
        assert gu_kernels is not None and dn_kernels is not None  # self.grouped
        act = op.tensor_ir_op(
            gu_kernels.gate_up_func(gu.spec, e, k, h, i),
            "moe_grouped_gate_up",
            [rows, weights, indptr, order, *gu.stored()],
            Tensor.placeholder((n * k, i), "float32"),
        )
        return op.tensor_ir_op(
            dn_kernels.down_func(dn.spec, e, k, i, h),
            "moe_grouped_down",
            [act, indptr, order, *dn.stored()],
            Tensor.placeholder((n, h), "float32"),
        )


def _one_token(b: Any, s: Any) -> bool:
    """Whether a step's shape is statically one token (the `decode` function)."""
    return all(isinstance(d, int | tirx.IntImm) and int(d) == 1 for d in (b, s))


@contextlib.contextmanager
def per_token_experts() -> Iterator[None]:
    """Within this block models are built with the per-token path at every batch (the path
    before the grouped GEMM; for benchmarks and tests).

    The compile cache key does not see this switch: compile the per-token variant into its own
    cache directory (or with force=True).
    """
    global _use_grouped
    saved, _use_grouped = _use_grouped, False
    try:
        yield
    finally:
        _use_grouped = saved
