"""Decoder hyper-parameters of every supported family (Llama 2/3, Mistral, Qwen2/3, SmolLM,
Gemma 3, Phi-3, Mixtral, Qwen3-MoE) and the demo presets.

One config class describes them all: the families differ by switches (q/k norms, sandwich norms,
gelu-tanh MLP, per-layer sliding windows and rope bases, embedding scaling, logit soft-capping,
LongRoPE and partial rotary dims, mixture-of-experts MLPs), each of which models/llama.py turns
into a few ops.
`LlamaConfig.from_hf` reads a Hugging Face `config.json` (families.py knows each model_type's
keys; gguf_file.py builds the same dict from a GGUF file's metadata). No tvm here: configs are
read by loaders that must not import the compiler.
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
    sliding_window: int | None = None  # the window of the "sliding" layers (Mistral, Gemma 3)
    model_type: str = "llama"
    # Family switches (families.py sets them from the HF config; the defaults are Llama's).
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP, plus a pre-MLP norm
    hidden_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # the embedding is multiplied by this (Gemma: sqrt(hidden))
    # Per layer "full" or "sliding" (attention over the last `sliding_window` positions only);
    # None: every layer full. Sliding layers rotate with `rope_local_theta` when it is set.
    layer_types: tuple[str, ...] | None = attrs.field(
        default=None, converter=lambda v: tuple(v) if v is not None else None
    )
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # softmax scale is its -1/2 power (default d)
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c)
    # Leading dims of each head that RoPE rotates (Phi-4-mini: 3/4 of head_dim); None: all.
    # Added after the fields above: `to_dict` leaves it out while None (see there).
    rotary_dim: int | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE; models/moe.py), all None in a dense model: each
    # MoE layer routes a token to `num_experts_per_tok` of `num_experts` SwiGLU experts of
    # `moe_intermediate_size`; `norm_topk_prob` renormalises the chosen probabilities;
    # `mlp_only_layers` keep a dense MLP of `intermediate_size` (Qwen3-MoE).
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    mlp_only_layers: tuple[int, ...] | None = attrs.field(
        default=None, converter=lambda v: tuple(int(i) for i in v) if v is not None else None
    )
    # Attention sinks (mlc_llm's attention_sink_size, StreamingLLM): the first positions every
    # sliding layer sees besides its window; None: none.
    attention_sink_size: int | None = None
    # A build option, not the model's: also export the `*_hidden` functions, which return the
    # final hidden states beside the logits (Medusa and EAGLE drafts read them). None: not.
    hidden_outputs: bool | None = None

    @property
    def sm_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def has_sliding_layers(self) -> bool:
        return self.layer_types is not None and "sliding" in self.layer_types

    @property
    def rope_in_model(self) -> bool:
        """RoPE applied by the model's own op rather than by the KV cache: needed when sliding
        layers rotate with a base of their own (Gemma; TVM's cache has one base for all), for
        LongRoPE (per-pair factors and a cos/sin scale) and for a partial rotary dim."""
        return (
            self.rope_local_theta is not None
            or self.rope_type == "longrope"
            or self.rope_dim != self.head_dim
        )

    @property
    def kv_window(self) -> tuple[int, int] | None:
        """(tokens kept, sink) when the KV cache can release what leaves the window: every
        layer slides, and RoPE is the cache's. A sliding sequence keeps its `sink` first tokens
        and its last `sliding_window` ones (tokens kept = both). The cache then rotates keys
        inline by position within what it holds (relative distances, hence attention,
        unchanged), which a model that rotates by itself cannot follow (Gemma 3; its global
        layers need every position anyway). None too when no sequence can outgrow the window
        (the mode costs some speed: docs/discussion/0011)."""
        layers = self.layer_types or ("full",)
        slides = self.sliding_window and self.sliding_window < self.context_window_size
        if slides and not self.rope_in_model and set(layers) == {"sliding"}:
            sink = self.attention_sink_size or 0
            return (self.sliding_window or 0) + sink, sink
        return None

    @property
    def rope_type(self) -> str | None:
        return (self.rope_scaling or {}).get("rope_type")

    @property
    def rope_dim(self) -> int:
        """How many leading dims of each q/k head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def longrope_factors(self) -> list[float] | None:
        """LongRoPE's per-pair factors for this config: the long set when the context window
        exceeds `original_max_position_embeddings`, else the short set, for every position
        (docs/discussion/0010: static, so the keys in the KV cache never change); None
        without LongRoPE."""
        if self.rope_type != "longrope":
            return None
        rs = self.rope_scaling or {}
        long = self.context_window_size > int(rs["original_max_position_embeddings"])
        return list(rs["long_factor" if long else "short_factor"])

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise)."""
        if self.rope_type != "longrope":
            return 1.0
        return float((self.rope_scaling or {}).get("attention_factor", 1.0))

    def for_context_window(self, window: int) -> LlamaConfig:
        """The config a server whose context window is `window` tokens runs. The same, except
        for LongRoPE served within its original window: that uses the short factors, which
        are compiled in, so the window becomes part of the config."""
        if self.rope_type != "longrope" or window >= self.context_window_size:
            return self
        orig = int((self.rope_scaling or {})["original_max_position_embeddings"])
        if window <= orig < self.context_window_size:
            return attrs.evolve(self, context_window_size=window)
        return self

    def with_sliding_window(self, window: int) -> LlamaConfig:
        """mlc_llm's `sliding_window_size` override: the model's sliding layers (Gemma 3) get
        this window, or, for a model without any, every layer attends to the last `window`
        positions (as Mistral v0.1). The window is compiled in, so this is another library."""
        if window <= 0:
            return self
        if self.has_sliding_layers:
            return attrs.evolve(self, sliding_window=window)
        layers = ("sliding",) * self.num_hidden_layers
        return attrs.evolve(self, sliding_window=window, layer_types=layers)

    def summary(self) -> str:
        """One short line for logs (the repr lists every layer's type: kilobytes)."""
        parts = [
            f"{self.model_type}: {self.num_hidden_layers} layers, hidden {self.hidden_size}",
            f"heads {self.num_attention_heads}/{self.num_key_value_heads}x{self.head_dim}",
            f"vocab {self.vocab_size}, context {self.context_window_size}",
        ]
        if self.has_sliding_layers:
            layers = self.layer_types or ()
            slid = sum(t == "sliding" for t in layers)
            parts.append(f"window {self.sliding_window} on {slid} of {len(layers)} layers")
        if self.attention_sink_size:
            parts.append(f"{self.attention_sink_size} sinks")
        if self.num_experts:
            parts.append(f"experts {self.num_experts_per_tok} of {self.num_experts}")
        if self.hidden_outputs:  # the library medusa / eagle read hidden states from
            parts.append("with hidden-state outputs")
        return ", ".join(parts)

    def with_attention_sinks(self, sink: int) -> LlamaConfig:
        """mlc_llm's `attention_sink_size` override: sliding layers also see the first `sink`
        positions. Compiled in, like the window."""
        if not self.has_sliding_layers:
            raise ValueError("attention sinks need a sliding window (no layer slides)")
        if not 0 <= sink < (self.sliding_window or 0):
            raise ValueError(f"attention_sink_size {sink} must be below the window")
        return attrs.evolve(self, attention_sink_size=sink or None)

    def with_hidden_outputs(self) -> LlamaConfig:
        """The same model, compiled with the `*_hidden` functions as well (models/llama.py)."""
        return attrs.evolve(self, hidden_outputs=True)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts (models/moe.py)."""
        return bool(self.num_experts) and layer not in (self.mlp_only_layers or ())

    def layer_theta(self, layer: int) -> float:
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding"
        return self.rope_local_theta if sliding and self.rope_local_theta else self.rope_theta

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF `config.json` (families.SUPPORTED model types)."""
        from mlctrio.models.families import family_fields

        return cls(**family_fields(cfg, frozenset(f.name for f in attrs.fields(cls))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (also the compile-cache key material): tuples become lists, so the dict
        equals itself after a JSON round trip (a library's build info is compared with it).
        Fields added later (`_LATER_FIELDS`) are left out at their default, so the dict of a
        config that does not use them is what earlier versions wrote."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}
        return {k: v for k, v in out.items() if not (k in _LATER_FIELDS and v is None)}


_LATER_FIELDS = (
    "rotary_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "mlp_only_layers",
    "attention_sink_size",
    "hidden_outputs",
)


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
