"""Weight name mapping: HF tensors -> MLC-named tensors -> the packed parameter list of the model.

Three name spaces:
- HF: `model.layers.0.self_attn.q_proj.weight`, `...mlp.gate_proj.weight`, ... (unfused, float;
  Phi-3 stores `self_attn.qkv_proj` and `mlp.gate_up_proj` fused, rows in our order).
- MLC: the names mlc-llm uses after its fusion and quantization, which are also our nn.Module's
  parameter names: `model.layers.0.self_attn.qkv_proj.weight` (q0) or `.q_weight` / `.q_scale` (q4),
  `model.layers.0.mlp.gate_up_proj.*`, norms as `*.weight`. MLC stores unquantized tensors in the
  quantization's model dtype (float16 for q0f16/q4f16_1), so `hf_to_mlc` does the same.
- params: the positional list the compiled functions take (param_mode="packed"), in
  `param_infos()` order, with our own dtypes (float32 norms/biases on CPU) and, for CPU linear
  weights marked "tile16", the tile16 layout (quantization.pack_tile_np) the kernels read.

Only name -> numpy dicts here; file formats (safetensors, MLC tensor-cache shards): formats.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.models.layers import LAYOUT_ATTR
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.moe_weights import moe_hf_to_mlc, random_moe_weights
from mlctrio.models.quantization import (
    TILE,
    TILE16,
    as_scheme,
    pack_tile_np,
    quantize_weight_np,
)

Arrays = Mapping[str, npt.NDArray]


@attrs.frozen
class ParamInfo:
    """One entry of the packed parameter tuple: `shape` is the MLC (file) shape; `layout` ""
    (as stored) or "tile16" (the module takes `runtime_shape`, see quantization.pack_tile_np)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str = ""

    @property
    def runtime_shape(self) -> tuple[int, ...]:
        if self.layout == TILE16:  # (stacked experts keep their leading axis)
            *lead, rows, cols = self.shape
            return (*lead, rows // TILE, cols, TILE)
        return self.shape

    @classmethod
    def of(cls, name: str, param: object) -> ParamInfo:
        """The info of an nn.Parameter of the model (whose shape is the runtime one)."""
        shape = tuple(int(s) for s in param.shape)  # type: ignore[attr-defined]
        layout = str(param.attrs.get(LAYOUT_ATTR, ""))  # type: ignore[attr-defined]
        if layout == TILE16:
            *lead, tiles, cols, tile = shape
            shape = (*lead, tiles * tile, cols)
        return cls(name, shape, str(param.dtype), layout)  # type: ignore[attr-defined]


def param_infos(
    config: LlamaConfig, quantization: str, act_dtype: str = "float32", cpu: bool = True
) -> list[ParamInfo]:
    """The packed params, in the order the compiled module expects: for the host CPU target
    (what compile_model builds by default) or, with `cpu=False`, for a target without tile16."""
    from mlctrio.models.llama import LlamaForCausalLM
    from mlctrio.models.target import host_cpu_target  # heavy tvm import, only when needed

    target = host_cpu_target() if cpu else None
    model = LlamaForCausalLM(config, quantization, target, act_dtype)
    return [ParamInfo.of(name, p) for name, p in model.named_parameters()]


def hf_to_mlc(config: LlamaConfig, hf: Arrays, quantization: str) -> dict[str, npt.NDArray]:
    """Fuse (q,k,v) and (gate,up), quantize linear weights and the embedding; MLC names, dtypes."""
    spec = as_scheme(quantization).default  # HF checkpoints: one format for every weight
    out: dict[str, npt.NDArray] = {}

    def put_linear(prefix: str, w: npt.NDArray) -> None:
        for name, arr in zip(spec.stored_names, quantize_weight_np(w, spec), strict=True):
            out[f"{prefix}.{name}"] = arr

    offset = norm_offset(config)

    def plain(name: str) -> npt.NDArray:
        return np.asarray(hf[name]).astype(spec.mlc_dtype)

    def norm(name: str) -> npt.NDArray:
        w = np.asarray(hf[name]).astype(np.float32)
        return (w + np.float32(offset) if offset else w).astype(spec.mlc_dtype)

    put_linear("model.embed_tokens", hf["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        put_linear(f"{a}.qkv_proj", fused(hf, a, "qkv_proj", ("q_proj", "k_proj", "v_proj")))
        if config.attention_bias:
            bias = fused(hf, a, "qkv_proj", ("q_proj", "k_proj", "v_proj"), "bias")
            out[f"{a}.qkv_proj.bias"] = bias.astype(spec.mlc_dtype)
        put_linear(f"{a}.o_proj", hf[f"{a}.o_proj.weight"])
        m = f"{p}.mlp"
        if config.is_moe_layer(i):  # the router and stacked experts (moe_weights.py)
            out.update(moe_hf_to_mlc(config, hf, i, spec))
        else:
            gate_up = fused(hf, m, "gate_up_proj", ("gate_proj", "up_proj"))
            put_linear(f"{m}.gate_up_proj", gate_up)
            put_linear(f"{m}.down_proj", hf[f"{m}.down_proj.weight"])
        for name in norm_names(config):
            out[f"{p}.{name}.weight"] = norm(f"{p}.{name}.weight")
    out["model.norm.weight"] = norm("model.norm.weight")
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in hf:
            raise KeyError("lm_head.weight missing and tie_word_embeddings is false")
        put_linear("lm_head", hf["lm_head.weight"])
    return out


def fused(
    hf: Arrays, prefix: str, name: str, parts: tuple[str, ...], kind: str = "weight"
) -> npt.NDArray:
    """`prefix.name.kind` as the checkpoint stores it already fused (Phi-3's qkv_proj and
    gate_up_proj, rows in the same order), else its `parts` concatenated along the rows."""
    if f"{prefix}.{name}.{kind}" in hf:
        return np.asarray(hf[f"{prefix}.{name}.{kind}"])
    return np.concatenate([np.asarray(hf[f"{prefix}.{x}.{kind}"]) for x in parts], axis=0)


def norm_names(config: LlamaConfig) -> tuple[str, ...]:
    """The RMSNorms of one layer, relative to `model.layers.{i}` (HF's names are ours)."""
    names = ("input_layernorm", "post_attention_layernorm")
    if config.sandwich_norms:
        names += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    if config.qk_norm:
        names += ("self_attn.q_norm", "self_attn.k_norm")
    return names


def norm_offset(config: LlamaConfig) -> float:
    """What HF checkpoints leave out of their norm weights: Gemma's RMSNorm multiplies by
    (1 + w), so 1 is added on load (as llama.cpp's converter does) and the model multiplies by
    the stored weight like every other family's."""
    return 1.0 if config.model_type.startswith("gemma") else 0.0


def mlc_to_params(mlc: Arrays, infos: list[ParamInfo]) -> list[npt.NDArray]:
    """Order MLC-named arrays as the packed param list, casting float dtypes to the model's.

    Raises KeyError for a missing name and ValueError for a shape or integer-dtype mismatch (a q4
    checkpoint loaded into a q0 model, say): silently reinterpreting weights would give garbage.
    """
    params = []
    for info in infos:
        if info.name not in mlc:
            raise KeyError(f"parameter {info.name!r} missing from weights")
        arr = np.asarray(mlc[info.name])
        if tuple(arr.shape) != info.shape:
            raise ValueError(f"{info.name}: shape {arr.shape} != expected {info.shape}")
        if arr.dtype != np.dtype(info.dtype):
            if arr.dtype.kind != "f" or np.dtype(info.dtype).kind != "f":
                raise ValueError(f"{info.name}: dtype {arr.dtype} != expected {info.dtype}")
            arr = arr.astype(info.dtype)
        params.append(pack_tile_np(arr) if info.layout == TILE16 else np.ascontiguousarray(arr))
    return params


def hf_to_params(
    config: LlamaConfig, hf: Arrays, quantization: str, infos: list[ParamInfo] | None = None
) -> list[npt.NDArray]:
    """HF tensors straight to the packed param list (fusing and quantizing on the way)."""
    infos = infos if infos is not None else param_infos(config, quantization)
    return mlc_to_params(hf_to_mlc(config, hf, quantization), infos)


def random_hf_weights(
    config: LlamaConfig, seed: int = 0, scale: float = 0.08
) -> dict[str, npt.NDArray]:
    """Random float32 HF-named weights (for tests and benchmarks). Norm weights near 1."""
    rng = np.random.default_rng(seed)
    c = config

    def w(*shape: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    hf: dict[str, npt.NDArray] = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        hf[f"{p}.self_attn.q_proj.weight"] = w(q_out, c.hidden_size)
        hf[f"{p}.self_attn.k_proj.weight"] = w(kv_out, c.hidden_size)
        hf[f"{p}.self_attn.v_proj.weight"] = w(kv_out, c.hidden_size)
        if c.attention_bias:
            for x, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                hf[f"{p}.self_attn.{x}_proj.bias"] = w(n)
        hf[f"{p}.self_attn.o_proj.weight"] = w(c.hidden_size, q_out)
        if c.is_moe_layer(i):
            hf.update(random_moe_weights(c, i, w))
        else:
            hf[f"{p}.mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
            hf[f"{p}.mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
            hf[f"{p}.mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
        if c.model_type == "phi3":  # Phi-3 checkpoints store both fused
            _fuse_in_place(hf, f"{p}.self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"))
            _fuse_in_place(hf, f"{p}.mlp", "gate_up_proj", ("gate_proj", "up_proj"))
        base = 1.0 - norm_offset(c)  # weights near 1 as the model multiplies by them
        for name in norm_names(c):
            size = c.head_dim if name.startswith("self_attn.") else c.hidden_size
            hf[f"{p}.{name}.weight"] = (base + w(size)).astype(np.float32)
    hf["model.norm.weight"] = (1.0 - norm_offset(c) + w(c.hidden_size)).astype(np.float32)
    if not c.tie_word_embeddings:
        hf["lm_head.weight"] = w(c.vocab_size, c.hidden_size)
    return hf


def _fuse_in_place(
    hf: dict[str, npt.NDArray], prefix: str, name: str, parts: tuple[str, ...]
) -> None:
    hf[f"{prefix}.{name}.weight"] = fused(hf, prefix, name, parts)
    for x in parts:
        del hf[f"{prefix}.{x}.weight"]
