"""A GGUF model file: its metadata, a LlamaConfig from it, and its weights under MLC names.

    mlctrio serve model.gguf          (or a directory holding exactly one .gguf)

Read with models/gguf_reader.py (memory-mapped; the `gguf` package's reader agrees with it on
every file tested, and its block formats are the reference for conversions). What comes from where:

- architecture and hyper-parameters: `general.architecture` ("llama" — Llama 1-3, Mistral,
  SmolLM, Mixtral —, "qwen2", "qwen3", "qwen3moe", "gemma3" or "phi3") and `<arch>.*` keys
  (block_count, embedding_length, feed_forward_length, attention.head_count[_kv],
  attention.key_length, rope.freq_base, context_length, ...), plus what llama.cpp fixes in
  code for Gemma 3 (`_gemma3_keys`) and Phi-3's LongRoPE (`_phi3_keys`); mixtures of experts
  (Mixtral, Qwen3-MoE: their keys, routers and stacked experts) in models/gguf_moe.py;
- tied embeddings: no `output.weight` tensor;
- weights: gguf_quants converts each tensor (exact for F32/F16/BF16/Q8_0/Q4_0/Q4_1); q, k, v are
  fused into qkv_proj and gate, up into gate_up_proj, as mlc-llm's llama names them (phi3 files
  hold them fused already: attn_qkv, and ffn_up with the gate rows first);
- Q/K rows: llama.cpp's converter permuted the rows of every head of attn_q / attn_k from HF's
  rotate-half RoPE layout to ggml's adjacent-pair layout (`LlamaModel.permute`) for the "llama"
  architecture; the paged KV cache applies rotate-half RoPE, so the rows are put back
  (`unpermute_rows`). Rows are independent in every GGUF type, so this is exact on the raw bytes.

The tokenizer and chat template come from the same metadata (runtime/gguf_tokenizer.py).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.errors import ModelLoadError
from mlctrio.models.gguf_moe import convert_experts, expert_sources, moe_keys, router
from mlctrio.models.gguf_quants import ConvertedTensor, convert, fuse_rows, stored_spec, widest
from mlctrio.models.gguf_reader import GGUFFile
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import QuantSpec, Scheme, get_quantization

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3")
PERMUTED_QK = ("llama",)  # architectures whose converter permuted attn_q / attn_k rows
_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                "gemma3": "gemma3_text", "phi3": "phi3"}  # fmt: skip
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
               "tokenizer.ggml.token_type")  # fmt: skip


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf in a directory (None if neither)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ModelLoadError(f"{p} holds several GGUF files ({names}): name one of them")
        return found[0] if found else None
    return None


@attrs.define
class GGUFModel:
    """An open GGUF file (memory-mapped)."""

    path: Path
    reader: Any
    metadata: dict[str, Any]
    _by_name: dict[str, Any] | None = None

    @classmethod
    def open(cls, path: str | Path) -> GGUFModel:
        """Read with gguf_reader.py (gguf-py's reader takes seconds on a 262k vocabulary)."""
        path = Path(path)
        try:
            reader = GGUFFile.open(path)
        except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
            raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
        return cls(path, reader, reader.metadata)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def summary(self) -> dict[str, Any]:
        """The metadata without the tokenizer's big arrays (for logs and /debug/config)."""
        return {k: v for k, v in self.metadata.items() if k not in _BIG_ARRAYS}

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def config(self) -> LlamaConfig:
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path.name}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        m = self.metadata

        def key(name: str, default: Any = None) -> Any:
            value = m.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelLoadError(f"{self.path.name}: metadata key {arch}.{name} is missing")
            return value

        scaling = m.get(f"{arch}.rope.scaling.type")
        supported = (None, "none", "linear") if arch == "gemma3" else (None, "none")
        if scaling not in supported or "rope_freqs.weight" in self._names():
            raise ModelLoadError(f"{self.path.name}: RoPE scaling ({scaling}) is not supported yet")
        heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
        tokens = m.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else int(key("vocab_size"))
        cfg = {
            "model_type": _MODEL_TYPES.get(arch, "llama"),
            "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(key("attention.head_count_kv", heads)),
            "head_dim": int(key("attention.key_length", hidden // heads)),
            "vocab_size": vocab,
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self._names(),
            "max_position_embeddings": int(key("context_length", 4096)),
            "attention_bias": "blk.0.attn_q.bias" in self._names(),
        }
        if arch == "gemma3":
            cfg.update(self._gemma3_keys(heads, hidden, cfg["head_dim"], scaling))
        if arch == "phi3":
            cfg.update(self._phi3_keys(cfg["max_position_embeddings"]))
        try:
            cfg.update(moe_keys(arch, m, self._names(), int(key("block_count"))))
            return LlamaConfig.from_hf(cfg)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path.name}: {exc}") from exc

    def _gemma3_keys(self, heads: int, hidden: int, head_dim: int, scaling: Any) -> dict[str, Any]:
        """What llama.cpp's gemma3 loader fixes in code rather than metadata: every 6th layer
        global, local RoPE base 10000, q scaled by head_dim^-1/2 (hidden/heads for the 27B)."""
        m = self.metadata
        layers = int(m["gemma3.block_count"])
        out: dict[str, Any] = {
            "sliding_window": m.get("gemma3.attention.sliding_window"),
            "sliding_window_pattern": 6,
            "rope_local_base_freq": float(m.get("gemma3.rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "final_logit_softcapping": m.get("gemma3.final_logit_softcapping"),
            "rms_norm_eps": float(m.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        }
        pattern = m.get("gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == layers:  # per layer: true = sliding
            out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        if scaling == "linear":
            factor = float(m.get("gemma3.rope.scaling.factor", 1.0))  # the HF factor (8 for 4B+)
            out["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        return out

    def _phi3_keys(self, context_length: int) -> dict[str, Any]:
        """llama.cpp's phi3: the rotated dims are rope.dimension_count; LongRoPE's factors are
        the tensors rope_factors_long / _short (one set for every layer), its attention factor
        and original context metadata. llama.cpp disables Phi-3's sliding window (full
        attention whatever attention.sliding_window says), so no window is passed on."""
        m = self.metadata
        out: dict[str, Any] = {"rotary_dim": m.get("phi3.rope.dimension_count")}
        if "rope_factors_long.weight" in self._names():
            orig = m.get("phi3.rope.scaling.original_context_length", context_length)
            out["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": self._float_vector("rope_factors_long.weight").tolist(),
                "short_factor": self._float_vector("rope_factors_short.weight").tolist(),
                "original_max_position_embeddings": int(orig),
                "attention_factor": float(m.get("phi3.rope.scaling.attn_factor", 1.0)),
            }
        return out

    def _names(self) -> dict[str, Any]:
        if self._by_name is None:
            self._by_name = {t.name: t for t in self.reader.tensors}
        return self._by_name

    def _tensor(self, name: str) -> tuple[npt.NDArray[Any], str, int]:
        t = self._names().get(name)
        if t is None:
            raise ModelLoadError(f"{self.path.name}: tensor {name} is missing")
        cols = int(t.shape[0])  # ggml's ne0: elements per row
        return np.asarray(t.data), t.tensor_type.name, cols

    def scheme(self) -> Scheme:
        """The storage scheme of the weights, from the tensor types alone (no conversion)."""
        c = self.config()
        specs: dict[str, QuantSpec] = {}
        modules = [(m, [n for n, _ in parts]) for m, parts in self._linear_sources(c)]
        modules += [(m, [n for g in groups for n in g]) for m, groups in self._expert_sources(c)]
        for module, names in modules:
            types = [self._tensor(name)[1] for name in names]
            specs[module] = widest([get_quantization(stored_spec(t)) for t in types])
        default = max(specs.values(), key=list(specs.values()).count)
        return Scheme(default, {m: s for m, s in specs.items() if s != default})

    def weights(self) -> dict[str, npt.NDArray[Any]]:
        """All weights under MLC names, stored as `scheme()` says."""
        c = self.config()
        out: dict[str, npt.NDArray[Any]] = {}
        converted: list[ConvertedTensor] = []
        for module, parts in self._linear_sources(c):
            tensors = [self._convert(name, heads) for name, heads in parts]
            tensor = tensors[0] if len(tensors) == 1 else fuse_rows(tensors, c.hidden_size)
            converted.append(tensor)
            for name, array in zip(tensor.spec.stored_names, tensor.arrays, strict=True):
                out[f"{module}.{name}"] = array
        experts = int(c.num_experts or 0)
        for module, groups in self._expert_sources(c):
            cols = int(self._names()[groups[0][0]].shape[0])
            stack = convert_experts(groups, experts, cols, self._convert)
            converted.append(stack)
            for name, array in zip(stack.spec.stored_names, stack.arrays, strict=True):
                out[f"{module}.{name}"] = array
        for i in filter(c.is_moe_layer, range(c.num_hidden_layers)):
            vector = self._float_vector(f"blk.{i}.ffn_gate_inp.weight")
            out[f"model.layers.{i}.mlp.gate.weight"] = router(vector, experts)
        for mlc_name, gguf_name in self._plain_tensors(c):
            out[mlc_name] = self._float_vector(gguf_name)
        if c.attention_bias:
            for i in range(c.num_hidden_layers):
                out[f"model.layers.{i}.self_attn.qkv_proj.bias"] = self._qkv_bias(c, i)
        _log_conversions(self.path.name, converted)
        return out

    def _plain_tensors(self, c: LlamaConfig) -> Iterator[tuple[str, str]]:
        """(MLC name, GGUF name) of the norms. Gemma's (1 + w) is already in the file (llama.cpp's
        converter added the 1); its ffn_norm is the pre-MLP norm of a sandwich."""
        yield "model.norm.weight", "output_norm.weight"
        for i in range(c.num_hidden_layers):
            p, b = f"model.layers.{i}", f"blk.{i}"
            yield f"{p}.input_layernorm.weight", f"{b}.attn_norm.weight"
            if c.sandwich_norms:
                yield f"{p}.post_attention_layernorm.weight", f"{b}.post_attention_norm.weight"
                yield f"{p}.pre_feedforward_layernorm.weight", f"{b}.ffn_norm.weight"
                yield f"{p}.post_feedforward_layernorm.weight", f"{b}.post_ffw_norm.weight"
            else:
                yield f"{p}.post_attention_layernorm.weight", f"{b}.ffn_norm.weight"
            if c.qk_norm:
                yield f"{p}.self_attn.q_norm.weight", f"{b}.attn_q_norm.weight"
                yield f"{p}.self_attn.k_norm.weight", f"{b}.attn_k_norm.weight"

    def _linear_sources(self, c: LlamaConfig) -> Iterator[tuple[str, list[tuple[str, int | None]]]]:
        """(MLC module, [(GGUF tensor, heads to un-permute by or None)]) of every linear."""
        yield "model.embed_tokens", [("token_embd.weight", None)]
        if not c.tie_word_embeddings:
            yield "lm_head", [("output.weight", None)]
        fused_up = self.architecture == "phi3"  # ffn_up: gate rows, then up rows
        for i in range(c.num_hidden_layers):
            p, b = f"model.layers.{i}", f"blk.{i}"
            if f"{b}.attn_qkv.weight" in self._names():
                yield f"{p}.self_attn.qkv_proj", [(f"{b}.attn_qkv.weight", None)]
            else:
                yield (
                    f"{p}.self_attn.qkv_proj",
                    [
                        (f"{b}.attn_q.weight", c.num_attention_heads),
                        (f"{b}.attn_k.weight", c.num_key_value_heads),
                        (f"{b}.attn_v.weight", None),
                    ],
                )
            yield f"{p}.self_attn.o_proj", [(f"{b}.attn_output.weight", None)]
            if c.is_moe_layer(i):
                continue  # experts: _expert_sources
            up = [(f"{b}.ffn_up.weight", None)]
            yield f"{p}.mlp.gate_up_proj", up if fused_up else [(f"{b}.ffn_gate.weight", None), *up]
            yield f"{p}.mlp.down_proj", [(f"{b}.ffn_down.weight", None)]

    def _expert_sources(self, c: LlamaConfig) -> Iterator[tuple[str, list[list[str]]]]:
        """(MLC module, [[GGUF tensors]]) of every MoE layer's experts (gguf_moe.py)."""
        for i in filter(c.is_moe_layer, range(c.num_hidden_layers)):
            for module, groups in expert_sources(self._names(), i, int(c.num_experts or 0)):
                yield f"model.layers.{i}.mlp.{module}", groups

    def _convert(self, name: str, heads: int | None = None) -> ConvertedTensor:
        """A tensor's rows converted: 2-D (rows, elements or bytes), or 3-D (E, rows, ...) as
        E x rows rows."""
        raw, type_name, cols = self._tensor(name)
        raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim >= 2 else raw.reshape(-1, cols)
        if heads is not None and self.architecture in PERMUTED_QK:
            raw = unpermute_rows(raw, heads)
        return convert(raw, type_name, cols)

    def _float_vector(self, name: str) -> npt.NDArray[np.float32]:
        raw, type_name, _ = self._tensor(name)
        if type_name in ("F32", "F16"):
            return np.asarray(raw, np.float32).reshape(-1)
        import gguf

        qtype = getattr(gguf.GGMLQuantizationType, type_name)
        return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(-1)

    def _qkv_bias(self, c: LlamaConfig, layer: int) -> npt.NDArray[np.float32]:
        heads = (c.num_attention_heads, c.num_key_value_heads, None)
        parts = []
        for x, h in zip("qkv", heads, strict=True):
            bias = self._float_vector(f"blk.{layer}.attn_{x}.bias")
            if h is not None and self.architecture in PERMUTED_QK:
                bias = unpermute_rows(bias[:, None], h)[:, 0]
            parts.append(bias)
        return np.concatenate(parts)


def unpermute_rows(w: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """Undo llama.cpp's `permute(w, heads)` on the rows of w (rows, ...): within each head, row
    2j + i of ggml's layout goes back to row i * d/2 + j of HF's (i in {0, 1})."""
    rows = w.shape[0]
    half = rows // heads // 2
    return np.ascontiguousarray(
        w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _log_conversions(name: str, tensors: list[ConvertedTensor]) -> None:
    """One line per (GGUF type -> stored format, how) that is not stored as it is in the file."""
    groups: dict[tuple[str, str, bool, str], list[ConvertedTensor]] = {}
    for t in tensors:
        if t.source_type.upper() != t.spec.name.upper() and not t.spec.name.startswith("q0"):
            groups.setdefault((t.source_type, t.spec.name, t.lossless, t.how), []).append(t)
    for (source, target, lossless, how), group in sorted(groups.items()):
        stored, given = sum(t.nbytes for t in group), sum(t.source_nbytes for t in group)
        how = "exactly, wider" if lossless else how or "re-quantized, not bit-exact"
        log.log(
            logging.INFO if lossless or how != "re-quantized, not bit-exact" else logging.WARNING,
            "%s: %d %s tensors have no kernel of their own: stored as %s (%s): %.1f MB in "
            "memory for %.1f MB in the file (%+.1f MB)",
            name, len(group), source, target, how, stored / 1e6, given / 1e6,
            (stored - given) / 1e6,
        )  # fmt: skip
