"""Llama-family hyper-parameters (Llama 2/3, Mistral, Qwen2, SmolLM) and the demo presets.

`LlamaConfig.from_hf` reads a Hugging Face `config.json` (gguf_file.py builds the same dict from a
GGUF file's metadata). No tvm here: configs are read by loaders that must not import the compiler.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class LlamaConfig:
    """Architecture hyper-parameters, read from a Hugging Face `config.json` by `from_hf`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = attrs.field(default=None, hash=False)
    tie_word_embeddings: bool = False
    context_window_size: int = 4096
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # Mistral; the context is capped to it (see from_hf)
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF `config.json` (llama, mistral, qwen2 model types)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type in (None, "default"):
                rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
            else:
                rope_scaling = {**rope_scaling, "rope_type": "llama3"}
        ctx = cfg.get("context_window_size") or cfg.get("max_position_embeddings") or 4096
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if window and int(window) < int(ctx):
            # The paged KV cache is created without sliding-window attention, so attending past
            # the window would differ from the model's definition: serve a context no longer
            # than the window instead (exact, like Mistral v0.2+ whose window >= context).
            ctx = int(window)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            context_window_size=int(ctx),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(window) if window else None,
            model_type=model_type,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (also the compile-cache key material)."""
        return attrs.asdict(self)


# Presets for tests and benchmarks (random weights; shapes only).
TINY = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=300,
    context_window_size=512,
)
SMALL = LlamaConfig(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    context_window_size=2048,
)
