"""Hugging Face `config.json` -> LlamaConfig fields, per model_type (one function per family).

Rules:
- Every family maps onto the one decoder of models/llama.py; what differs is a switch of
  LlamaConfig (qk_norm, sandwich_norms, hidden_act, layer_types, ...). A family that needs an op
  the decoder lacks is not listed here rather than approximated.
- Configs come in two spellings: transformers 4.x (`rope_theta`, `rope_scaling`,
  `rope_local_base_freq`, `sliding_window_pattern`) and 5.x (`rope_parameters`, per layer type for
  Gemma 3, and `layer_types`). Both are read; the result is the same.
- A dict written by `LlamaConfig.to_dict` (our own artifacts) is read back field for field.
- Unsupported model types and RoPE scalings raise ValueError (the loaders turn it into one line).
- Values that transformers computes with in float32 (LongRoPE's factors and attention factor)
  are stored rounded to float32, so a config read from a GGUF file (which stores them as float32)
  is the same config.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from typing import Any

SUPPORTED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen3_moe",
)
_ROPE_TYPES = (None, "default", "llama3", "linear", "longrope", "su")


def family_fields(cfg: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """LlamaConfig keyword arguments for a parsed `config.json` (or a `to_dict` dict, read by
    the config's field `names`)."""
    if "sandwich_norms" in cfg and "qk_norm" in cfg:  # our own to_dict
        return {k: v for k, v in cfg.items() if k in names}
    model_type = cfg.get("model_type", "llama")
    if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
        # A Gemma 3 vision-language config: serve its text decoder.
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    parse = _FAMILIES.get(model_type)
    if parse is None:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {SUPPORTED})")
    return parse(cfg)


def _rope_params(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """{rope_type, rope_theta, ...} of the config (of one layer type where it has several)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    out = dict(params) if isinstance(params, dict) else {}
    if isinstance(cfg.get("rope_scaling"), dict):
        out = {**cfg["rope_scaling"], **out}
    out.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return out


def _scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
    if rope_type in (None, "default"):
        return None
    keep = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    return {**keep, "rope_type": "longrope" if rope_type == "su" else rope_type}


def _common(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rope = _rope_params(cfg, "full_attention")
    ctx = cfg.get("context_window_size") or cfg.get("max_position_embeddings") or 4096
    return {
        "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "vocab_size": int(cfg["vocab_size"]),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(rope["rope_theta"]),
        "rope_scaling": _scaling(rope),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "context_window_size": int(ctx),
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "model_type": model_type,
    }


def _llama(cfg: dict[str, Any]) -> dict[str, Any]:
    out = _common(cfg, "llama")
    if out["rope_scaling"] and out["rope_scaling"]["rope_type"] != "llama3":
        raise ValueError(f"unsupported rope_scaling type {out['rope_scaling']['rope_type']!r}")
    return out


def _mistral(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_llama(cfg), "model_type": "mistral"}
    window = cfg.get("sliding_window")
    out["sliding_window"] = int(window) if window else None
    if window and int(window) < out["context_window_size"]:
        # Every layer attends to the last `window` positions (Mistral v0.1); v0.2+ has
        # window >= context, which is plain full attention.
        out["layer_types"] = ("sliding",) * out["num_hidden_layers"]
    return out


def _phi3(cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3/3.5/4-mini: Mistral's decoder with LongRoPE ("longrope", older files "su") and a
    partial rotary dim; HF stores qkv_proj and gate_up_proj fused (weights.py takes them)."""
    out = {**_common(cfg, "phi3"), "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5))}
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden activation {cfg.get('hidden_act')!r}")
    rope = _rope_params(cfg)
    partial = float(rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    # `rotary_dim`: what a GGUF file says (rope.dimension_count), else transformers' rule.
    rotary = int(cfg.get("rotary_dim") or int(out["head_dim"] * partial))
    if rotary <= 0 or rotary % 2 or rotary > out["head_dim"]:
        raise ValueError(f"unsupported rotary dim {rotary} (head_dim {out['head_dim']})")
    if rotary != out["head_dim"]:
        out["rotary_dim"] = rotary
    if out["rope_scaling"] is not None:
        out["rope_scaling"] = _longrope(cfg, out["rope_scaling"], rotary)
    window = cfg.get("sliding_window")
    out["sliding_window"] = int(window) if window else None
    if window and int(window) < out["context_window_size"]:
        out["layer_types"] = ("sliding",) * out["num_hidden_layers"]  # as Mistral v0.1
    return out


def _longrope(cfg: dict[str, Any], scaling: dict[str, Any], rotary: int) -> dict[str, Any]:
    """The LongRoPE parameters as transformers reads them: a top-level
    `original_max_position_embeddings` wins; the attention factor is the given one, else
    sqrt(1 + ln(s) / ln(orig)) with s = `factor`, else max_position_embeddings / orig."""
    if scaling["rope_type"] != "longrope":
        raise ValueError(f"unsupported rope_scaling type {scaling['rope_type']!r} for phi3")
    orig = cfg.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings"
    )
    if not orig:
        raise ValueError("LongRoPE without original_max_position_embeddings")
    orig = int(orig)
    factors = {k: _f32(scaling.get(k) or []) for k in ("short_factor", "long_factor")}
    if any(len(f) != rotary // 2 for f in factors.values()):
        raise ValueError(f"LongRoPE factors must have rotary_dim / 2 = {rotary // 2} entries")
    attn = scaling.get("attention_factor")
    if attn is None:
        ratio = scaling.get("factor") or int(cfg.get("max_position_embeddings") or orig) / orig
        attn = math.sqrt(1 + math.log(ratio) / math.log(orig)) if ratio > 1.0 else 1.0
    return {
        "rope_type": "longrope",
        **factors,
        "original_max_position_embeddings": orig,
        "attention_factor": _f32([attn])[0],
    }


def _f32(values: Any) -> list[float]:
    return array("f", [float(v) for v in values]).tolist()


def _qwen2(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_llama(cfg), "model_type": "qwen2"}
    out["attention_bias"] = bool(cfg.get("attention_bias", True))
    return out


def _qwen3(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_llama(cfg), "model_type": "qwen3", "qk_norm": True}
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ValueError("Qwen3 with use_sliding_window is not supported")
    return out


def _mixtral(cfg: dict[str, Any]) -> dict[str, Any]:
    """Mixtral: Mistral's decoder with a mixture of SwiGLU experts of `intermediate_size` in
    every layer; the chosen probabilities are always renormalised."""
    out = {**_mistral(cfg), "model_type": "mixtral"}
    experts = int(cfg.get("num_local_experts") or 0)
    return {**out, **_moe(cfg, experts, out["intermediate_size"], True)}


def _qwen3_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3 with experts of `moe_intermediate_size`, renormalised only with
    `norm_topk_prob`; a layer in `mlp_only_layers`, or off the `decoder_sparse_step`, keeps a
    dense MLP. transformers 5 writes `num_local_experts`, Hub configs `num_experts`."""
    out = {**_qwen3(cfg), "model_type": "qwen3_moe"}
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (Qwen2-MoE) are not supported")
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if not experts:
        return out  # every layer dense
    layers, step = out["num_hidden_layers"], int(cfg.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    dense |= {i for i in range(layers) if (i + 1) % step}
    size = int(cfg.get("moe_intermediate_size") or out["intermediate_size"])
    out.update(_moe(cfg, experts, size, bool(cfg.get("norm_topk_prob", False))))
    if dense:
        out["mlp_only_layers"] = tuple(sorted(i for i in dense if i < layers))
    return out


def _moe(cfg: dict[str, Any], experts: int, size: int, norm: bool) -> dict[str, Any]:
    top_k = int(cfg.get("num_experts_per_tok") or 2)
    if experts <= 0 or not 0 < top_k <= experts:
        raise ValueError(f"unsupported experts: {top_k} of {experts}")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden activation {cfg.get('hidden_act')!r}")
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": size,
        "norm_topk_prob": norm,
    }


def gemma3_layer_types(cfg: dict[str, Any], layers: int) -> tuple[str, ...]:
    """ "sliding"/"full" per layer: `layer_types`, else every `sliding_window_pattern`-th (6)
    layer full, as transformers derives it."""
    given = cfg.get("layer_types")
    if given:
        return tuple("sliding" if t == "sliding_attention" else "full" for t in given)
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers))


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_common(cfg, "gemma3_text"), "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6))}
    if out["rope_scaling"] and out["rope_scaling"]["rope_type"] != "linear":
        raise ValueError(f"unsupported rope_scaling type {out['rope_scaling']['rope_type']!r}")
    # 4.x: `rope_scaling` is the full layers' only; the sliding ones rotate with
    # `rope_local_base_freq`. 5.x: `rope_parameters` per layer type.
    local_theta = cfg.get("rope_local_base_freq")
    per_type = cfg.get("rope_parameters")
    if isinstance(per_type, dict) and isinstance(per_type.get("sliding_attention"), dict):
        local = per_type["sliding_attention"]
        if _scaling({**local, "rope_theta": None}):
            raise ValueError("RoPE scaling on Gemma 3's sliding layers is not supported")
        local_theta = local.get("rope_theta", local_theta)
    window = cfg.get("sliding_window")
    types = gemma3_layer_types(cfg, out["num_hidden_layers"])
    if not window or int(window) >= out["context_window_size"]:
        types = tuple("full" for _ in types)  # a window covering the context is full attention
    out.update(
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qk_norm=True,
        sandwich_norms=True,
        hidden_act=_gelu_tanh(cfg.get("hidden_activation") or cfg.get("hidden_act")),
        embed_scale=float(out["hidden_size"]) ** 0.5,
        layer_types=types,
        sliding_window=int(window) if window else None,
        rope_local_theta=float(local_theta or 10000.0),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or out["head_dim"]),
        final_logit_softcapping=_optional_float(cfg.get("final_logit_softcapping")),
    )
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
    return out


def _gelu_tanh(act: Any) -> str:
    if act not in (None, "gelu_pytorch_tanh", "gelu_tanh", "gelu"):
        raise ValueError(f"unsupported hidden activation {act!r}")
    return "gelu_tanh"


def _optional_float(value: Any) -> float | None:
    return float(value) if value else None


_FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
}
