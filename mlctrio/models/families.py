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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_ROPE_TYPES = (None, "default", "llama3", "linear")


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
    return {**keep, "rope_type": rope_type}


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


def _qwen2(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_llama(cfg), "model_type": "qwen2"}
    out["attention_bias"] = bool(cfg.get("attention_bias", True))
    return out


def _qwen3(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_llama(cfg), "model_type": "qwen3", "qk_norm": True}
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ValueError("Qwen3 with use_sliding_window is not supported")
    return out


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
}
