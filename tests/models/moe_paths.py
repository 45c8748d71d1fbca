"""The two expert paths of one MoE layer (models/moe.py) compiled alone with compile.py's
pipeline, for test_moe.py: the per-token gather and the grouped GEMM of several-token steps,
both taking (rows (n, H), routing weights (n, top_k), expert ids (n, top_k)), so a test
chooses the routing itself.

Shapes: 8 experts, top 2, hidden 64, experts of 32: under group formats both projections take
the tile16 layout (32 inputs are a whole group), the layout the grouped kernels need.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mlctrio.models.layers import LAYOUT_ATTR
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.moe_weights import stack_quantized
from mlctrio.models.quantization import (
    TILE16,
    QuantSpec,
    Scheme,
    effective_weight_np,
    get_quantization,
    pack_tile_np,
)

EXPERTS, HIDDEN, INTER = 8, 64, 32
CONFIG = LlamaConfig(
    hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=320, context_window_size=256,
    model_type="qwen3_moe", num_experts=EXPERTS, num_experts_per_tok=2,
    moe_intermediate_size=INTER, norm_topk_prob=True,
)  # fmt: skip


def stored_experts(spec: QuantSpec, shape: tuple[int, int, int], rng: Any) -> list[np.ndarray]:
    """Random stored tensors of E stacked (E, N, K) weights: group formats any words and
    scales (and mins), float formats quantized from normals."""
    e, n, k = shape
    if not spec.is_group:
        return stack_quantized(rng.standard_normal(shape).astype(np.float32) * 0.2, spec)
    words = rng.integers(0, 2**32, (e, n, k * spec.bits // 32), dtype=np.uint32)
    scales = rng.uniform(0.002, 0.03, (e, n, k // 32, spec.scales_per_group))
    if spec.has_min:
        scales[..., 1] = rng.uniform(-0.1, 0.1, scales[..., 1].shape)
    return [words, scales.reshape(e, n, -1).astype(spec.scale_dtype)]


def _compile(quant: str) -> tuple[Any, list[tuple[str, Any]]]:
    import tvm
    from tvm.relax.frontend import nn

    from mlctrio.models.compile import _pipeline
    from mlctrio.models.moe import MoEMLP
    from mlctrio.models.target import host_cpu_target

    class Paths(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            self.mlp = MoEMLP(CONFIG, Scheme.parse(quant), "float32", "mlp")
            self.mlp.use_cpu_layout()
            assert self.mlp.grouped

        def grouped(self, x: Any, w: Any, ids: Any) -> Any:
            return self.mlp.grouped_experts(x, w, ids)

        def per_token(self, x: Any, w: Any, ids: Any) -> Any:
            return self.mlp.experts_per_token(x, w, ids)

    k = CONFIG.num_experts_per_tok
    args = {"x": nn.spec.Tensor(["n", HIDDEN], "float32"),
            "w": nn.spec.Tensor(["n", k], "float32"),
            "ids": nn.spec.Tensor(["n", k], "int32")}  # fmt: skip
    mod, named = Paths().export_tvm({"grouped": args, "per_token": args})
    target = host_cpu_target()
    ex = tvm.compile(mod, target=target, relax_pipeline=_pipeline(target))
    return tvm.relax.VirtualMachine(ex, tvm.cpu()), named


@functools.cache
def build_paths(quant: str) -> tuple[Any, Any, list[np.ndarray], list[np.ndarray]]:
    """(grouped, per_token, params, [gate_up, down] as float32 (E, N, K)) for `quant`."""
    vm, named = _compile(quant)
    spec, rng = get_quantization(quant), np.random.default_rng(5)
    stored, effective = {}, []
    for name, (n, k) in (
        ("moe_gate_up_proj", (2 * INTER, HIDDEN)),
        ("moe_down_proj", (HIDDEN, INTER)),
    ):
        arrays = stored_experts(spec, (EXPERTS, n, k), rng)
        stored.update(
            {f"mlp.{name}.{s}": a for s, a in zip(spec.stored_names, arrays, strict=True)}
        )
        experts = [effective_weight_np([a[e] for a in arrays], spec, k) for e in range(EXPERTS)]
        effective.append(np.stack(experts))
    params = []
    for name, param in named:  # the router's weight is not used
        arr = stored.get(name, np.zeros([int(d) for d in param.shape], param.dtype))
        params.append(pack_tile_np(arr) if param.attrs.get(LAYOUT_ATTR) == TILE16 else arr)
    return vm["grouped"], vm["per_token"], params, effective


def experts_reference(x: Any, w: Any, ids: Any, gate_up: Any, down: Any) -> np.ndarray:
    """sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, j], in float64."""
    out = np.zeros(x.shape, np.float64)
    for t, j in np.ndindex(*ids.shape):
        g = gate_up[ids[t, j]].astype(np.float64) @ x[t]
        gate, up = g[:INTER], g[INTER:]
        out[t] += down[ids[t, j]] @ (gate / (1 + np.exp(-gate)) * up * w[t, j])
    return out


def routings(rng: Any) -> dict[str, np.ndarray]:
    """Named (n, 2) expert ids: rows only on experts 1..5 (0, 6 and 7 get none); expert 3 in
    every token (37 rows: whole blocks of dequantised tiles and a 1-row tail); one token; 70
    tokens, so every expert has many rows."""

    def pick(n: int, pool: list[int]) -> np.ndarray:
        return np.stack([rng.choice(pool, 2, replace=False) for _ in range(n)]).astype(np.int32)

    on3 = pick(37, [0, 1, 2, 4, 5, 6, 7])
    on3[:, 1] = 3
    return {
        "zero-row experts": pick(6, [1, 2, 3, 4, 5]),
        "all on expert 3": on3,
        "one token": pick(1, list(range(EXPERTS))),
        "many rows": pick(70, list(range(EXPERTS))),
    }
