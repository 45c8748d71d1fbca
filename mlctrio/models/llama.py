"""Llama-family model (Llama 2/3, Mistral, Qwen2) in `tvm.relax.frontend.nn` over a paged KV cache.

The structure follows mlc-llm's llama: fused qkv projection reshaped to (b, s, h_q + 2 h_kv, d) and
handed to `PagedKVCache.attention_with_fused_qkv` (RoPE is applied by the KV cache), RMSNorm, SwiGLU
with a fused gate_up projection, GQA, tied or untied lm_head. Parameter names equal mlc-llm's after
its fusion (`model.layers.0.self_attn.qkv_proj.weight`, `...q_weight`/`q_scale` when quantized), so
MLC weights map 1:1 onto `LlamaForCausalLM.named_parameters()` order.

Linear layers are our own `te.compute` (see quantization.matmul_te) rather than `nn.Linear`: the
dequantization sits inside the reduction, which the CPU schedules in schedules.py recognise. On the
CPU the weights of layers whose output features split into tiles of 16 take the "tile16" layout
(quantization.pack_tile_np; the param carries `attrs[LAYOUT_ATTR]`), which the loader produces.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.target import Target

from mlctrio.models import int8_cpu
from mlctrio.models.attention_cpu import CPUPagedKVCache
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import TILE, TILE16, QuantSpec, Scheme, as_scheme, uses_int8
from mlctrio.models.te_ops import (
    embedding_te,
    matmul_te,
    matmul_tile16_te,
    rms_norm_te,
    swiglu_te,
)

LAYOUT_ATTR = "mlctrio.layout"  # nn.Parameter attr: TILE16 when the weight is stored tile16


# pylint: disable=missing-docstring,invalid-name


class QLinear(nn.Module):
    """y = x @ W.T (+ b) with W stored as `weight` (q0) or `q_weight` + `q_scale` (q4)."""

    def __init__(self, in_f: int, out_f: int, spec: QuantSpec, act_dtype: str, bias: bool = False):
        super().__init__()
        self.spec, self.act_dtype, self.in_f, self.out_f = spec, act_dtype, in_f, out_f
        self.cpu_layout = False  # set by LlamaForCausalLM for llvm targets
        self.tile16 = False  # weights in the tile16 layout (use_cpu_layout)
        self.int8 = False  # int8 activations, int8_cpu's VNNI kernels (use_cpu_layout)
        # Every Parameter gets an explicit dtype: Module.to() would also cast packed uint32 weights.
        if spec.is_group:
            groups = -(-in_f // spec.group_size)  # a partial last group is padded, as in mlc-llm
            words = groups * spec.group_size // spec.elems_per_word
            self.q_weight = nn.Parameter((out_f, words), "uint32")
            self.q_scale = nn.Parameter((out_f, groups * spec.scales_per_group), spec.scale_dtype)
        else:
            self.weight = nn.Parameter((out_f, in_f), spec.weight_dtype)
        self.bias = nn.Parameter((out_f,), act_dtype) if bias else None

    def stored(self) -> list[nn.Parameter]:
        return [self.q_weight, self.q_scale] if self.spec.is_group else [self.weight]

    def use_cpu_layout(self, tile16: bool, vnni: bool = False) -> None:
        """CPU kernels; with `tile16` (needs out features % 16 == 0) the tile16 weight layout;
        with `vnni` too, int8 activations for group-quantized weights (int8_cpu.py)."""
        self.cpu_layout = True
        if not tile16 or self.out_f % TILE:
            return
        self.tile16 = True
        self.int8 = vnni and uses_int8(self.spec, self.out_f, self.in_f)
        names = ("q_weight", "q_scale") if self.spec.is_group else ("weight",)
        for name in names:
            old: nn.Parameter = getattr(self, name)
            out_f, cols = (int(d) for d in old.shape)
            new = nn.Parameter((out_f // TILE, cols, TILE), old.dtype)
            new.attrs[LAYOUT_ATTR] = TILE16
            setattr(self, name, new)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        if self.int8:
            one_row = isinstance(b, int) and isinstance(s, int) and b * s == 1
            rows = x if isinstance(s, int) and s == 1 else op.reshape(x, (b * s, 1, self.in_f))
            y = op.reshape(self._int8_matmul(rows, one_row), (b, s, self.out_f))
        elif self.tile16:
            y4 = op.tensor_expr_op(
                matmul_tile16_te(self.spec, self.act_dtype), "matmul", [x, *self.stored()]
            )
            y = op.reshape(y4, (b, s, self.out_f))
        else:
            y = op.tensor_expr_op(
                matmul_te(self.spec, self.act_dtype, self.out_f, self.cpu_layout),
                "matmul",
                [x, *self.stored()],
            )
        return y + self.bias if self.bias is not None else y

    def _int8_matmul(self, x: Tensor, one_row: bool) -> Tensor:
        """x (rows, 1, K) -> (rows, 1, N / 16, 16) by int8_cpu's kernels."""
        rows = x.shape[0]
        k, tiles = self.in_f, self.out_f // TILE
        xq, xd = op.tensor_ir_op(
            int8_cpu.q8_quantize_func(k),
            "q8_quantize",
            [x],
            [
                Tensor.placeholder((rows, k // 8, 2), "int32"),
                Tensor.placeholder((rows, k // int8_cpu.GROUP, 2), "float32"),
            ],
        )
        rows_block = 1 if one_row else int8_cpu.ROWS_BLOCK
        s = self.spec
        return op.tensor_ir_op(
            int8_cpu.group_q8_matmul_func(
                tiles, k, rows_block, s.scale_dtype, s.bits, s.zero, s.has_min
            ),
            "group_q8_matmul",
            [xq, xd, *self.stored()],
            Tensor.placeholder((rows, 1, tiles, TILE), "float32"),
        )


class QEmbedding(QLinear):
    """Token embedding table in the same storage as QLinear, so a tied lm_head reuses it."""

    def __init__(self, vocab: int, hidden: int, spec: QuantSpec, act_dtype: str):
        super().__init__(hidden, vocab, spec, act_dtype, bias=False)
        self.hidden = hidden

    def embed(self, ids: Tensor) -> Tensor:
        f = embedding_te(self.spec, self.act_dtype, self.hidden, self.tile16)
        return op.tensor_expr_op(f, "embedding", [ids, *self.stored()])


class RMSNorm(nn.Module):
    """RMSNorm as our own two-stage TE op (sum of squares, then scale) that schedules.py can
    parallelise over rows; relax's rms_norm legalises to seven serial blocks."""

    def __init__(self, hidden: int, eps: float, act_dtype: str):
        self.weight = nn.Parameter((hidden,), act_dtype)
        self.eps, self.hidden = eps, hidden

    def forward(self, x: Tensor) -> Tensor:
        return op.tensor_expr_op(rms_norm_te(self.hidden, self.eps), "rms_norm", [x, self.weight])


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str):
        self.d, self.h_q, self.h_kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        qkv_out = (self.h_q + 2 * self.h_kv) * self.d
        qkv_spec = scheme.spec_for(f"{prefix}.qkv_proj")
        self.qkv_proj = QLinear(c.hidden_size, qkv_out, qkv_spec, act_dtype, c.attention_bias)
        o_spec = scheme.spec_for(f"{prefix}.o_proj")
        self.o_proj = QLinear(self.h_q * self.d, c.hidden_size, o_spec, act_dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.h_q + 2 * self.h_kv, self.d))
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.h_q, sm_scale=self.d**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.h_q * self.d)))


class LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str):
        h, i = c.hidden_size, c.intermediate_size
        self.gate_up_proj = QLinear(h, 2 * i, scheme.spec_for(f"{prefix}.gate_up_proj"), act_dtype)
        self.down_proj = QLinear(i, h, scheme.spec_for(f"{prefix}.down_proj"), act_dtype)

    def forward(self, x: Tensor) -> Tensor:
        swiglu = swiglu_te(self.down_proj.in_f)  # in_f: the intermediate size
        act = op.tensor_expr_op(swiglu, "swiglu", [self.gate_up_proj(x)])
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str, prefix: str):
        self.self_attn = LlamaAttention(c, scheme, act_dtype, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(c, scheme, act_dtype, f"{prefix}.mlp")
        eps = c.rms_norm_eps
        self.input_layernorm = RMSNorm(c.hidden_size, eps, act_dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps, act_dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, scheme: Scheme, act_dtype: str):
        embed_spec = scheme.spec_for("model.embed_tokens")
        self.embed_tokens = QEmbedding(c.vocab_size, c.hidden_size, embed_spec, act_dtype)
        self.layers = nn.ModuleList(
            [
                LlamaDecoderLayer(c, scheme, act_dtype, f"model.layers.{i}")
                for i in range(c.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, act_dtype)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id)
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

    def _logits(self, h: Tensor) -> Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        logits = head(h)
        return logits.astype("float32") if logits.dtype != "float32" else logits

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

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        # batch_decode with a static batch of 1 (as in mlc-llm): its matmuls are matrix-vector
        # products, which get one-row kernels (no row padding, one weight stream per tile).
        return self.batch_decode(input_embed, paged_kv_cache)

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._forward(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_prefill_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        # The final (normed) hidden state at every position: embeddings pool it.
        h = self._forward(input_embeds, paged_kv_cache)
        return (h.astype("float32") if h.dtype != "float32" else h), paged_kv_cache

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
        # (attention_cpu.py); for other targets it is exactly TIRPagedKVCache.
        return CPUPagedKVCache(
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
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling or {},
            rope_ext_factors=_rope_ext_factors_none(),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.act_dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.config.hidden_size, self.act_dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        mod_spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {
                "input_embed": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, h], dt),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "decode": {
                "input_embed": nn.spec.Tensor([1, 1, h], dt),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_verify": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_prefill_to_last_hidden_states": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(mod_spec, self)


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


def _shape_expr(values: list[int]) -> Any:
    from tvm import relax as rx

    return rx.ShapeExpr(values)


def _rope_ext_factors_none() -> Any:
    from tvm import relax as rx

    return rx.prim_value(0)
