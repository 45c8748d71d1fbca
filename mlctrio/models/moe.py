"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE in `tvm.relax.frontend.nn`.

Rules:
- One module replaces LlamaMLP in an MoE layer (models/llama.py picks it by
  `LlamaConfig.is_moe_layer`). Its parameters, named as mlc-llm's Qwen3-MoE names them:
  `mlp.gate.weight` (the router, (E, H), always float32), `mlp.moe_gate_up_proj.*` (E, 2 I, H)
  with each expert's gate rows then its up rows, and `mlp.moe_down_proj.*` (E, H, I), in the
  layer's QuantSpec storage (weights.py stacks the experts of an HF checkpoint).
- Router logits are a float32 linear (QLinear, its CPU layout like any other); routing is
  te_moe.route_func; the experts multiply through te_moe.expert_matmul_te, which indexes the
  stacked weights by the chosen expert ids, so a step reads only the experts it uses.
- Prefill and batched decode gather per token: each (token, slot) multiplies by its expert's
  weights, so tokens that share an expert read it once each (a grouped GEMM over tokens sorted
  by expert is not done). Group-quantized experts always take float activations (no int8 path).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

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
        gate_up_spec = scheme.spec_for(f"{prefix}.moe_gate_up_proj")
        self.moe_gate_up_proj = ExpertLinear(e, h, 2 * i, gate_up_spec, act_dtype)
        down_spec = scheme.spec_for(f"{prefix}.moe_down_proj")
        self.moe_down_proj = ExpertLinear(e, i, h, down_spec, act_dtype)

    def use_cpu_layout(self) -> None:
        """The CPU kernels and layouts of the experts (ExpertLinear.use_cpu_layout)."""
        self.moe_gate_up_proj.use_cpu_layout()
        self.moe_down_proj.use_cpu_layout()

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
        gate_up = self.moe_gate_up_proj(rows, ids, combine=False)
        act = op.tensor_expr_op(moe_act_te(self.intermediate), "moe_act", [gate_up, weights])
        out = self.moe_down_proj(act, ids, combine=True)
        return op.reshape(out, (b, s, self.hidden))
