"""Mixture-of-experts weights: HF per-expert tensors -> the stacked MLC tensors of models/moe.py.

Rules:
- HF checkpoints store one tensor per expert and projection: Mixtral
  `block_sparse_moe.experts.{e}.w1` (gate) / `w3` (up) / `w2` (down) and the router
  `block_sparse_moe.gate`; Qwen3-MoE `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj` and
  `mlp.gate`. Both become `model.layers.{i}.mlp.gate.weight` (float32 (E, H)),
  `mlp.moe_gate_up_proj.*` (E, 2 I, H: gate rows, then up rows) and `mlp.moe_down_proj.*`
  (E, H, I), quantized row by row exactly as a plain linear (quantization.quantize_weight_np).
- numpy only (no tvm), like the rest of the loaders' name mapping (weights.py calls in here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import QuantSpec, quantize_weight_np

Arrays = Mapping[str, npt.NDArray]
# HF names per family: the MoE block under model.layers.{i}, and (gate, up, down) per expert.
_HF_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def hf_moe_names(config: LlamaConfig, layer: int) -> tuple[str, tuple[str, str, str]]:
    """(`model.layers.{layer}.<block>`, (gate, up, down) projection names) of an HF checkpoint."""
    block, proj = _HF_NAMES.get(config.model_type, _HF_NAMES["qwen3_moe"])
    return f"model.layers.{layer}.{block}", proj


def stack_quantized(stacked: npt.NDArray, spec: QuantSpec) -> list[npt.NDArray]:
    """The stored arrays of E stacked (E, N, K) weights under `spec`: each expert's as a plain
    linear's, with the leading E axis."""
    e, n, k = stacked.shape
    flat = quantize_weight_np(stacked.reshape(e * n, k), spec)
    return [np.ascontiguousarray(a.reshape(e, n, *a.shape[1:])) for a in flat]


def moe_hf_to_mlc(
    config: LlamaConfig, hf: Arrays, layer: int, spec: QuantSpec
) -> dict[str, npt.NDArray]:
    """The MLC tensors of one MoE layer's router and stacked experts."""
    src, (gate, up, down) = hf_moe_names(config, layer)
    dst = f"model.layers.{layer}.mlp"
    experts = range(int(config.num_experts or 0))

    def get(e: int, proj: str) -> npt.NDArray:
        return np.asarray(hf[f"{src}.experts.{e}.{proj}.weight"], np.float32)

    gate_up = np.stack([np.concatenate([get(e, gate), get(e, up)], axis=0) for e in experts])
    down_w = np.stack([get(e, down) for e in experts])
    out = {f"{dst}.gate.weight": np.asarray(hf[f"{src}.gate.weight"], np.float32)}
    for name, arr in (("moe_gate_up_proj", gate_up), ("moe_down_proj", down_w)):
        for stored, value in zip(spec.stored_names, stack_quantized(arr, spec), strict=True):
            out[f"{dst}.{name}.{stored}"] = value
    return out


def random_moe_weights(
    config: LlamaConfig, layer: int, w: Callable[..., npt.NDArray[np.float32]]
) -> dict[str, npt.NDArray[np.float32]]:
    """Random HF-named router and expert tensors of one MoE layer (`w(*shape)` draws one)."""
    c = config
    src, (gate, up, down) = hf_moe_names(c, layer)
    h, i = c.hidden_size, int(c.moe_intermediate_size or 0)
    out = {f"{src}.gate.weight": w(int(c.num_experts or 0), h)}
    for e in range(int(c.num_experts or 0)):
        out[f"{src}.experts.{e}.{gate}.weight"] = w(i, h)
        out[f"{src}.experts.{e}.{up}.weight"] = w(i, h)
        out[f"{src}.experts.{e}.{down}.weight"] = w(h, i)
    return out
