"""The decoder of every supported family (Llama 2/3, Mistral, Qwen2/3, Gemma 3, Phi-3, Mixtral,
Qwen3-MoE) in `tvm.relax.frontend.nn` over a paged KV cache.

The structure follows mlc-llm's llama: fused qkv projection reshaped to (b, s, h_q + 2 h_kv, d) and
handed to `PagedKVCache.attention_with_fused_qkv` (RoPE is applied by the KV cache), RMSNorm, SwiGLU
with a fused gate_up projection, GQA, tied or untied lm_head. Parameter names equal mlc-llm's after
its fusion (`model.layers.0.self_attn.qkv_proj.weight`, `...q_weight`/`q_scale` when quantized), so
MLC weights map 1:1 onto `LlamaForCausalLM.named_parameters()` order.

The families' differences are LlamaConfig switches, each a few ops here: q/k norms per head before
RoPE (Qwen3, Gemma 3), Gemma's sandwich norms, GeGLU, embedding scale and logit soft-capping, and
per-layer sliding windows with per-layer RoPE bases (Gemma 3), LongRoPE and partial rotary dims
(Phi-3), where RoPE moves from the cache into the model (layers.rotate_qk) because TVM's cache
rotates with one base and neither per-pair factors nor a cos/sin scale. The building blocks
(quantized linears, norms, RoPE) are models/layers.py's; the mixture-of-experts MLP that replaces
LlamaMLP in an MoE layer is models/moe.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.target import Target

from mlctrio.models.attention_cpu import CPUPagedKVCache
from mlctrio.models.layers import (
    QEmbedding,
    QLinear,
    RMSNorm,
    norm_qk_heads,
    rope_inv_freq,
    rotate_qk,
)
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.llama_spec import default_spec
from mlctrio.models.moe import MoEMLP
from mlctrio.models.quantization import GROUP_ROWS, QuantSpec, Scheme, as_scheme
from mlctrio.models.te_ops import geglu_te, softcap_te, swiglu_te

# pylint: disable=missing-docstring,invalid-name


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str, layer: int):
        self.d, self.h_q, self.h_kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        sliding = c.layer_types is not None and c.layer_types[layer] == "sliding"
        # A sliding layer tells the CPU attention kernels so by a negative scale (attention_cpu.py)
        self.sm_scale = -c.sm_scale if sliding else c.sm_scale
        qkv_out = (self.h_q + 2 * self.h_kv) * self.d
        qkv_spec = scheme.spec_for(f"{prefix}.qkv_proj")
        self.qkv_proj = QLinear(c.hidden_size, qkv_out, qkv_spec, act_dtype, c.attention_bias)
        o_spec = scheme.spec_for(f"{prefix}.o_proj")
        self.o_proj = QLinear(self.h_q * self.d, c.hidden_size, o_spec, act_dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.d, c.rms_norm_eps, act_dtype)
            self.k_norm = RMSNorm(self.d, c.rms_norm_eps, act_dtype)
        self.inv_freq = layer_inv_freq(c, layer) if c.rope_in_model else None
        self.rope_scale = c.rope_attention_factor

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, positions: Any) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.h_q + 2 * self.h_kv, self.d))
        if hasattr(self, "q_norm"):
            qkv = norm_qk_heads(qkv, self.q_norm, self.k_norm, self.h_q, self.h_kv)
        if self.inv_freq is not None:
            qkv = rotate_qk(qkv, positions, self.h_q, self.h_kv, self.inv_freq, self.rope_scale)
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.h_q, sm_scale=self.sm_scale)
        return self.o_proj(op.reshape(out, (b, s, self.h_q * self.d)))


def layer_inv_freq(c: LlamaConfig, layer: int) -> Any:
    """The inverse frequencies a layer rotates with when RoPE is in the model: its base
    (Gemma's sliding layers have their own), Gemma's linear scaling on the full layers, or
    LongRoPE's factors (the set `LlamaConfig.longrope_factors` picks), over `rope_dim`."""
    sliding = c.layer_types is not None and c.layer_types[layer] == "sliding"
    scaling = c.rope_scaling or {}
    factor = 1.0 if sliding or scaling.get("rope_type") != "linear" else scaling["factor"]
    return rope_inv_freq(c.rope_dim, c.layer_theta(layer), float(factor), c.longrope_factors)


class LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str):
        h, i = c.hidden_size, c.intermediate_size
        self.gate_up_proj = QLinear(h, 2 * i, scheme.spec_for(f"{prefix}.gate_up_proj"), act_dtype)
        self.down_proj = QLinear(i, h, scheme.spec_for(f"{prefix}.down_proj"), act_dtype)
        self.gated = geglu_te if c.hidden_act == "gelu_tanh" else swiglu_te

    def forward(self, x: Tensor) -> Tensor:
        gated = self.gated(self.down_proj.in_f)  # in_f: the intermediate size
        act = op.tensor_expr_op(gated, "gated_act", [self.gate_up_proj(x)])
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    """Llama: x + attn(norm(x)), then + mlp(norm(x)), the second norm named
    post_attention_layernorm. Gemma's sandwich: each branch's output is normed too, and the
    pre-MLP norm is pre_feedforward_layernorm (HF's names in both cases)."""

    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, layer: int):
        prefix = f"model.layers.{layer}"
        self.self_attn = LlamaAttention(c, scheme, act_dtype, f"{prefix}.self_attn", layer)
        mlp = MoEMLP if c.is_moe_layer(layer) else LlamaMLP  # (Mixtral, Qwen3-MoE: moe.py)
        self.mlp = mlp(c, scheme, act_dtype, f"{prefix}.mlp")
        eps, h = c.rms_norm_eps, c.hidden_size
        self.input_layernorm = RMSNorm(h, eps, act_dtype)
        self.post_attention_layernorm = RMSNorm(h, eps, act_dtype)
        self.sandwich = c.sandwich_norms
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, act_dtype)
            self.post_feedforward_layernorm = RMSNorm(h, eps, act_dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, positions: Any) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), kv, layer_id, positions)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str):
        embed_spec = scheme.spec_for("model.embed_tokens")
        self.embed_tokens = QEmbedding(
            c.vocab_size, c.hidden_size, embed_spec, act_dtype, c.embed_scale
        )
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(c, scheme, act_dtype, i) for i in range(c.num_hidden_layers)]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, act_dtype)
        self.rope_in_model = c.rope_in_model

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        positions = None
        if self.rope_in_model:
            b, s, _ = x.shape
            positions = kv.get_query_positions(b * s)
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id, positions)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The exported model. Functions and signatures match mlc-llm's engine expectations."""

    def __init__(
        self,
        config: LlamaConfig,
        quantization: QuantSpec | Scheme | str,
        target: Target,
        act_dtype: str,
    ):
        scheme = as_scheme(quantization)
        self.config, self.scheme, self.target, self.act_dtype = config, scheme, target, act_dtype
        self.model = LlamaModel(config, scheme, act_dtype)
        if not config.tie_word_embeddings:
            head_spec = scheme.spec_for("lm_head")
            self.lm_head = QLinear(config.hidden_size, config.vocab_size, head_spec, act_dtype)
        if target is not None and target.kind.name == "llvm":
            vnni = has_vnni(target) and scheme.activations != "f32"
            for _, module in _named_modules(self):
                if isinstance(module, QEmbedding):  # tile16 only where it is also the lm_head
                    module.use_cpu_layout(tile16=config.tie_word_embeddings, vnni=vnni)
                elif isinstance(module, QLinear):
                    module.use_cpu_layout(tile16=True, vnni=vnni)
                elif isinstance(module, MoEMLP):
                    module.use_cpu_layout()
        #: whether any layer decodes with the float group kernel, whose other row blocks
        #: `batch_decode_r2` / `_r8` then export (llama_spec.py)
        self.row_block_forms = any(
            isinstance(m, QLinear) and m.group_decode for _, m in _named_modules(self)
        )

    def _logits(self, h: Tensor) -> Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        logits = head(h)
        logits = logits.astype("float32") if logits.dtype != "float32" else logits
        cap = self.config.final_logit_softcapping
        return op.tensor_expr_op(softcap_te(cap), "softcap", [logits]) if cap else logits

    def _forward(self, embeds: Tensor, kv: PagedKVCache) -> Tensor:
        return self.model(embeds, kv)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens.embed(input_ids)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        h = self._forward(input_embed, paged_kv_cache)
        return self._logits(_last_position(h)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        h = self._forward(input_embeds, paged_kv_cache)
        # The runner validates positions too; the gather clamps, so a bad one cannot segfault.
        h = _take_positions(h, logit_positions)
        return self._logits(h), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._forward(input_embeds, paged_kv_cache)), paged_kv_cache

    # batch_decode with the float group kernels taking 2 or 8 rows a block instead of GROUP_ROWS
    # (quantization.decode_row_block: 2 rows, and 5 or more); the `_hidden` ones likewise
    def batch_decode_r2(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return _with_rows(self, 2, self.batch_decode, input_embeds, paged_kv_cache)

    def batch_decode_r8(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return _with_rows(self, 8, self.batch_decode, input_embeds, paged_kv_cache)

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        # batch_decode with a static batch of 1 (as in mlc-llm): its matmuls are matrix-vector
        # products, which get one-row kernels (no row padding, one weight stream per tile).
        return self.batch_decode(input_embed, paged_kv_cache)

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._forward(input_embeds, paged_kv_cache)), paged_kv_cache

    # The `*_hidden` functions (exported when config.hidden_outputs): the same steps, also
    # returning the final normed hidden state of every new position, which Medusa heads and
    # EAGLE's draft layer read (runtime/hidden_tap.py).
    def batch_prefill_hidden(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        h = self._forward(input_embeds, paged_kv_cache)
        logits = self._logits(_take_positions(h, logit_positions))
        return logits, _f32(h), paged_kv_cache

    def batch_decode_hidden(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        h = self._forward(input_embeds, paged_kv_cache)
        return self._logits(h), _f32(h), paged_kv_cache

    def decode_hidden(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self.batch_decode_hidden(input_embed, paged_kv_cache)

    def batch_decode_hidden_r2(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return _with_rows(self, 2, self.batch_decode_hidden, input_embeds, paged_kv_cache)

    def batch_decode_hidden_r8(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return _with_rows(self, 8, self.batch_decode_hidden, input_embeds, paged_kv_cache)

    def batch_prefill_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        # The final (normed) hidden state at every position: embeddings pool it.
        h = self._forward(input_embeds, paged_kv_cache)
        return _f32(h), paged_kv_cache

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        # On llvm, CPUPagedKVCache swaps in our parallel/vectorised attention kernels
        # (attention_cpu.py), which also run the sliding layers (window=); for other targets it
        # is exactly TIRPagedKVCache. RoPE in the model (per-layer bases) means none in the cache.
        in_model = c.rope_in_model
        if c.has_sliding_layers and (self.target is None or self.target.kind.name != "llvm"):
            raise ValueError("sliding-window layers need the CPU attention kernels (llvm target)")
        return CPUPagedKVCache(
            window=(c.sliding_window or 0) if c.has_sliding_layers else 0,
            sink=c.attention_sink_size or 0,
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=_shape_expr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if in_model else RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling={} if in_model else (c.rope_scaling or {}),
            rope_ext_factors=_rope_ext_factors_none(),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.act_dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        return default_spec(self)


def has_vnni(target: Target) -> bool:
    """Whether an llvm target has AVX512-VNNI (int8_cpu's kernels)."""
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx512vnni", target))


def _named_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []

    def _walk(prefix: str, m: nn.Module) -> None:
        out.append((prefix, m))
        items = enumerate(m) if isinstance(m, nn.ModuleList) else vars(m).items()
        for name, child in items:
            if isinstance(child, nn.Module):
                _walk(f"{prefix}.{name}" if prefix else str(name), child)

    _walk("", root)
    return out


def _with_rows(root: nn.Module, rows: int, step: Callable[..., Any], *args: Any) -> Any:
    """`step(*args)` traced with every QLinear's float group kernel taking `rows` rows a
    block (LlamaForCausalLM's batch_decode_r2 / _r8)."""
    layers = [m for _, m in _named_modules(root) if isinstance(m, QLinear)]
    try:
        for m in layers:
            m.group_rows = rows
        return step(*args)
    finally:
        for m in layers:
            m.group_rows = GROUP_ROWS


def _last_position(h: Tensor) -> Tensor:
    """h[:, -1:, :] as a TE op (symbolic seq_len)."""
    from tvm import te

    def _index(x: te.Tensor) -> te.Tensor:
        b, s, d = x.shape
        return te.compute(
            (b, 1, d),
            lambda i, _, k: x[i, s - 1, k],
            name="index",
            attrs={"mlctrio.kind": "injective"},
        )

    return op.tensor_expr_op(_index, "index", [h])


def _take_positions(h: Tensor, positions: Tensor) -> Tensor:
    """h[:, positions, :] as a TE op, each position clamped into [0, seq_len): relax's take in
    its default "fast" mode reads out of bounds on a bad index (and warns at every compile)."""
    from tvm import te

    def _gather(x: te.Tensor, pos: te.Tensor) -> te.Tensor:
        b, s, d = x.shape
        n = pos.shape[0]

        def at(i: Any, j: Any, k: Any) -> Any:
            last = (s - 1).astype("int64")
            p = tirx.max(tirx.min(pos[j].astype("int64"), last), tirx.const(0, "int64"))
            return x[i, p, k]

        return te.compute((b, n, d), at, name="take_positions", attrs={"mlctrio.kind": "injective"})

    return op.tensor_expr_op(_gather, "take_positions", [h, positions])


def _f32(h: Tensor) -> Tensor:
    return h.astype("float32") if h.dtype != "float32" else h


def _shape_expr(values: list[int]) -> Any:
    from tvm import relax as rx

    return rx.ShapeExpr(values)


def _rope_ext_factors_none() -> Any:
    from tvm import relax as rx

    return rx.prim_value(0)
