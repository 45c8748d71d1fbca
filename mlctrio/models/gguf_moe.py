"""Mixture-of-experts GGUF files (Mixtral, Qwen3-MoE): their config keys and expert tensors.

How llama.cpp writes them (convert_hf_to_gguf.py; src/models/llama.cpp, qwen3moe.cpp):
- Mixtral is architecture "llama" with `llama.expert_count` / `llama.expert_used_count`; its
  experts are of `feed_forward_length`; the top-k probabilities are always renormalised.
- Qwen3-MoE is "qwen3moe": experts of `expert_feed_forward_length`; llama.cpp's qwen3moe graph
  hard-codes the renormalisation (the converter records no `norm_topk_prob`: an
  `expert_weights_norm` key is read if a file has one). Its tensor list has no dense MLP, so the
  converter refuses a checkpoint with `mlp_only_layers` and llama.cpp requires experts in every
  layer; a layer here without a router (`ffn_gate_inp`) is read as a dense one all the same.
- Per MoE layer: the router `blk.N.ffn_gate_inp.weight` (ne (H, E)), and the experts stacked
  into 3-D tensors `ffn_gate_exps` / `ffn_up_exps` (ne (H, I, E)) and `ffn_down_exps`
  (ne (I, H, E)), or gate and up fused as `ffn_gate_up_exps` (each expert's gate rows, then its
  up rows: `--fuse-gate-up-exps`); older Mixtral files hold one 2-D tensor per expert,
  `blk.N.ffn_gate.E.weight` (and ffn_up / ffn_down).

Where they go (models/moe.py's names): `model.layers.N.mlp.gate.weight` (E, H) float32 whatever
the file holds; `mlp.moe_gate_up_proj.*` (E, 2 I, H) and `mlp.moe_down_proj.*` (E, H, I) in the
format gguf_quants gives the experts' GGUF type. A 3-D tensor's data is experts x rows x bytes,
and every conversion works row by row, so the E x rows rows convert as one 2-D tensor and are
reshaped back; gate and up of different types are brought to the wider one (fuse_rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from mlctrio.models.gguf_quants import ConvertedTensor, fuse_rows

_MODEL_TYPES = {"llama": "mixtral", "qwen3moe": "qwen3_moe"}
Convert = Callable[[str], ConvertedTensor]  # GGUF tensor name -> its rows converted


def moe_keys(arch: str, metadata: dict[str, Any], names: Any, layers: int) -> dict[str, Any]:
    """The HF config keys (families._mixtral / _qwen3_moe read them) of an MoE file's
    `<arch>.*` metadata; {} for a dense file. `names`: the file's tensor names."""
    m = metadata
    experts = int(m.get(f"{arch}.expert_count") or 0)
    if not experts:
        return {}
    if arch not in _MODEL_TYPES:
        raise ValueError(f"mixture-of-experts files of architecture {arch!r} are not supported")
    used = m.get(f"{arch}.expert_used_count")
    if isinstance(used, list):  # per layer (llama.cpp's get_key_or_arr): one value only
        used = used[0] if len(set(used)) == 1 else None
    if not used:
        raise ValueError(f"{arch}.expert_used_count is missing or differs between layers")
    if m.get(f"{arch}.expert_shared_count") or any("_shexp" in n for n in names):
        raise ValueError("shared experts are not supported")
    out: dict[str, Any] = {"num_experts_per_tok": int(used)}
    if arch == "llama":  # Mixtral: experts of feed_forward_length, always renormalised
        return {**out, "model_type": "mixtral", "num_local_experts": experts}
    size = m.get(f"{arch}.expert_feed_forward_length")
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    return {
        **out,
        "model_type": "qwen3_moe",
        "num_experts": experts,
        "moe_intermediate_size": int(size) if size else None,
        "norm_topk_prob": bool(m.get(f"{arch}.expert_weights_norm", True)),
        "mlp_only_layers": dense,
    }


def expert_sources(names: Any, layer: int, experts: int) -> Iterator[tuple[str, list[list[str]]]]:
    """(module under `model.layers.{layer}.mlp`, [[GGUF tensors]]) of the layer's experts: one
    group whose rows are already (E, N) in order, or gate and up groups to interleave per
    expert. A group is one stacked tensor or E per-expert ones."""
    b = f"blk.{layer}"

    def group(part: str) -> list[str]:
        if f"{b}.ffn_{part}_exps.weight" in names:
            return [f"{b}.ffn_{part}_exps.weight"]
        return [f"{b}.ffn_{part}.{e}.weight" for e in range(experts)]

    if f"{b}.ffn_gate_up_exps.weight" in names:
        yield "moe_gate_up_proj", [[f"{b}.ffn_gate_up_exps.weight"]]
    else:
        yield "moe_gate_up_proj", [group("gate"), group("up")]
    yield "moe_down_proj", [group("down")]


def convert_experts(
    groups: list[list[str]], experts: int, cols: int, convert: Convert
) -> ConvertedTensor:
    """The stored arrays of one expert module, each (E, N, ...)."""
    parts = [_joined([convert(name) for name in g], cols) for g in groups]
    t = _joined(parts, cols)
    if len(parts) == 1:
        arrays = [a.reshape(experts, -1, *a.shape[1:]) for a in t.arrays]
    else:  # [gate of every expert; up of every expert] -> per expert: gate rows, up rows
        arrays = [
            a.reshape(2, experts, -1, *a.shape[1:])
            .swapaxes(0, 1)
            .reshape(experts, -1, *a.shape[1:])
            for a in t.arrays
        ]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    return ConvertedTensor(t.spec, arrays, t.source_type, t.lossless, t.source_nbytes, t.how)


def _joined(parts: list[ConvertedTensor], cols: int) -> ConvertedTensor:
    return parts[0] if len(parts) == 1 else fuse_rows(parts, cols)


def router(vector: npt.NDArray[np.float32], experts: int) -> npt.NDArray[np.float32]:
    """The router (E, H) in float32 from its flattened values."""
    return np.ascontiguousarray(vector.reshape(experts, -1), np.float32)
