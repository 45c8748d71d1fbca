"""Pure-numpy reference forward of the same Llama definition, with an explicit per-sequence KV.

Used by tests (TVM logits vs this) and by the benchmark as the numpy/OpenBLAS yardstick. It takes
MLC-named stored params (see weights.py) and multiplies by the *effective* float32 weights (the
dequantised q4 values), so a quantized compiled model should match it to float32 rounding.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import (
    QuantSpec,
    Scheme,
    as_scheme,
    effective_weight_np,
    q8_linear_np,
    uses_int8,
)

F32 = npt.NDArray[np.float32]


def rope_inv_freq(config: LlamaConfig) -> F32:
    """Inverse frequencies per rotary pair, with llama3 scaling as TVM's KV cache applies it."""
    d = config.head_dim
    inv = 1.0 / np.power(config.rope_theta, np.arange(0, d, 2, dtype=np.float64) / d)
    rs = config.rope_scaling
    if rs and rs.get("rope_type") == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        smooth = np.clip((old * inv / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv.astype(np.float32)


def apply_rope(x: F32, positions: npt.NDArray[np.int64], inv_freq: F32) -> F32:
    """Rotate-half (GPT-NeoX style) RoPE on x (n, heads, d) at the given positions."""
    ang = positions[:, None].astype(np.float32) * inv_freq[None, :]  # (n, d/2)
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rot * sin).astype(np.float32)


def rms_norm(x: F32, w: F32, eps: float) -> F32:
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps) * w).astype(np.float32)


@attrs.define
class RefKVCache:
    """seq_id -> per-layer (k, v) arrays of shape (length, h_kv, d), keys already rotated."""

    num_layers: int
    seqs: dict[int, list[tuple[F32, F32]]] = attrs.Factory(dict)

    def add_sequence(self, seq_id: int) -> None:
        self.seqs[seq_id] = [(np.zeros((0, 0, 0), np.float32),) * 2] * self.num_layers

    def remove_sequence(self, seq_id: int) -> None:
        del self.seqs[seq_id]

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        n = self.length(parent) if fork_pos == -1 else fork_pos
        self.seqs[child] = [(k[:n].copy(), v[:n].copy()) for k, v in self.seqs[parent]]

    def popn(self, seq_id: int, n: int) -> None:
        keep = self.length(seq_id) - n
        self.seqs[seq_id] = [(k[:keep], v[:keep]) for k, v in self.seqs[seq_id]]

    def length(self, seq_id: int) -> int:
        return int(self.seqs[seq_id][0][0].shape[0])


class ReferenceLlama:
    """Numpy forward. `params` are MLC-named stored arrays as produced by weights.hf_to_mlc."""

    def __init__(
        self,
        config: LlamaConfig,
        params: dict[str, np.ndarray],
        quantization: QuantSpec | Scheme | str,
        int8: bool = False,
    ):
        """`int8`: the compiled model multiplies group-quantized layers with int8 activations
        (a CPU with VNNI, models/int8_cpu.py); the reference then rounds those layers' inputs
        the same way."""
        self.c, self.int8 = config, int8
        self.scheme = scheme = as_scheme(quantization)
        self.inv_freq = rope_inv_freq(config)
        # id of a weight whose layer takes int8 inputs -> its spec and per-group mins (has_min)
        self.int8_inputs: dict[int, tuple[QuantSpec, F32 | None]] = {}

        def lin(prefix: str, cols: int = config.hidden_size) -> F32:
            spec = scheme.spec_for(prefix)
            stored = [params[f"{prefix}.{n}"] for n in spec.stored_names]
            w = effective_weight_np(stored, spec, cols)
            if int8 and uses_int8(spec, *w.shape):
                mins = stored[1][:, 1::2].astype(np.float32) if spec.has_min else None
                self.int8_inputs[id(w)] = spec, mins
            return w

        self.embed = lin("model.embed_tokens")
        self.lm_head = self.embed if config.tie_word_embeddings else lin("lm_head")
        self.norm = params["model.norm.weight"].astype(np.float32)
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}"
            bias = params.get(f"{p}.self_attn.qkv_proj.bias")
            self.layers.append(
                {
                    "qkv": lin(f"{p}.self_attn.qkv_proj"),
                    "qkv_bias": None if bias is None else bias.astype(np.float32),
                    "o": lin(f"{p}.self_attn.o_proj", config.num_attention_heads * config.head_dim),
                    "gate_up": lin(f"{p}.mlp.gate_up_proj"),
                    "down": lin(f"{p}.mlp.down_proj", config.intermediate_size),
                    "ln1": params[f"{p}.input_layernorm.weight"].astype(np.float32),
                    "ln2": params[f"{p}.post_attention_layernorm.weight"].astype(np.float32),
                }
            )

    def new_cache(self) -> RefKVCache:
        return RefKVCache(self.c.num_hidden_layers)

    def _linear(self, x: F32, w: F32) -> F32:
        if id(w) in self.int8_inputs:
            return q8_linear_np(x, w, *self.int8_inputs[id(w)])
        return x @ w.T

    def forward(
        self, cache: RefKVCache, seq_id: int, tokens: list[int], *, hidden: bool = False
    ) -> F32:
        """Append tokens to seq_id; return logits (len(tokens), vocab) at each new position, or
        with `hidden` the final (normed) hidden states (len(tokens), hidden_size)."""
        c = self.c
        mm = self._linear
        h_q, h_kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        start = cache.length(seq_id)
        n = len(tokens)
        pos = np.arange(start, start + n)
        x = self.embed[np.asarray(tokens)]
        group = h_q // h_kv
        for li, lw in enumerate(self.layers):
            hN = rms_norm(x, lw["ln1"], c.rms_norm_eps)
            qkv = mm(hN, lw["qkv"])
            if lw["qkv_bias"] is not None:
                qkv = qkv + lw["qkv_bias"]
            qkv = qkv.reshape(n, h_q + 2 * h_kv, d)
            q = apply_rope(qkv[:, :h_q], pos, self.inv_freq)
            k = apply_rope(qkv[:, h_q : h_q + h_kv], pos, self.inv_freq)
            v = qkv[:, h_q + h_kv :]
            old_k, old_v = cache.seqs[seq_id][li]
            if old_k.shape[0] == 0:
                old_k, old_v = (
                    np.zeros((0, h_kv, d), np.float32),
                    np.zeros((0, h_kv, d), np.float32),
                )
            kk, vv = np.concatenate([old_k, k]), np.concatenate([old_v, v])
            cache.seqs[seq_id][li] = (kk, vv)
            kk_q = np.repeat(kk, group, axis=1)  # (T, h_q, d)
            vv_q = np.repeat(vv, group, axis=1)
            scores = np.einsum("nhd,thd->hnt", q, kk_q) / math.sqrt(d)
            mask = np.arange(start + n)[None, :] > pos[:, None]  # causal over absolute positions
            scores = np.where(mask[None], -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = np.einsum("hnt,thd->nhd", probs, vv_q).reshape(n, h_q * d)
            x = x + mm(attn, lw["o"])
            gu = mm(rms_norm(x, lw["ln2"], c.rms_norm_eps), lw["gate_up"])
            gate, up = gu[:, : c.intermediate_size], gu[:, c.intermediate_size :]
            x = x + mm(gate / (1 + np.exp(-gate)) * up, lw["down"])
        x = rms_norm(x, self.norm, c.rms_norm_eps)
        return x.astype(np.float32) if hidden else mm(x, self.lm_head).astype(np.float32)
