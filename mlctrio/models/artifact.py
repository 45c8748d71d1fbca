"""A model: a Hugging Face checkpoint, an MLC artifact or a GGUF file, opened the same way.

    HF    config.json + *.safetensors (single or sharded) + tokenizer files
    MLC   mlc-chat-config.json + tensor-cache.json / ndarray-cache.json + params_shard_*.bin
    GGUF  one .gguf file (or a directory holding one): config, tokenizer, template and weights
          all in the file (gguf_file.py); the weights keep the file's formats

`open_artifact` reads the config, `load_params` the weights (memory-mapped; quantized on load when
an HF checkpoint is served with a quantization), and `convert_weight` / `gen_config` write the MLC
format from an HF checkpoint (`mlctrio convert-weight`, `mlctrio gen-config`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy.typing as npt

from ..errors import ModelLoadError
from . import formats
from .llama_config import LlamaConfig
from .quantization import HF_QUANTIZATIONS, Scheme

log = logging.getLogger(__name__)

QUANTIZATIONS = HF_QUANTIZATIONS
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# mlc-llm's model_config key names that differ from HF's.
_MLC_TO_HF_KEYS = {"position_embedding_base": "rope_theta"}


@attrs.frozen
class ModelArtifact:
    path: Path
    format: Literal["hf", "mlc", "gguf"]
    config: LlamaConfig
    quantization: str  # a QuantSpec name, or a Scheme name for GGUF files
    raw_config: Mapping[str, Any]
    gguf: Any = None  # the open gguf_file.GGUFModel of a GGUF artifact


def _llama_config(cfg: Mapping[str, Any], where: Path) -> LlamaConfig:
    try:
        return LlamaConfig.from_hf(dict(cfg))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{where}: unsupported or incomplete model config: {exc}") from exc


def open_artifact(
    path: str | Path, quantization: str | None = None, activations: str = "auto"
) -> ModelArtifact:
    """Open a model. `quantization` applies to HF checkpoints (default q0f32); an MLC artifact
    or a GGUF file is already quantized and must not be asked for a different one.
    `activations` (quantization.ACTIVATIONS) is how group-quantized layers take their inputs;
    "auto" means f32 for GGUF files (exact, see quantization.py) and q8 where VNNI otherwise."""
    root = Path(path)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r} (known: {QUANTIZATIONS})")
    from .gguf_file import find_gguf

    gguf_path = find_gguf(root)
    if gguf_path is not None:
        return _open_gguf(gguf_path, quantization, activations)
    if (root / formats.MLC_CHAT_CONFIG).exists():
        chat = formats.read_mlc_chat_config(root)
        stored = str(chat.get("quantization", "q0f32"))
        if quantization is not None and quantization != stored:
            raise ModelLoadError(
                f"{root} holds {stored} weights; re-run convert-weight for {quantization}"
            )
        model_cfg = {
            _MLC_TO_HF_KEYS.get(k, k): v for k, v in dict(chat.get("model_config", {})).items()
        }
        model_cfg.setdefault("model_type", chat.get("model_type", "llama"))
        if "context_window_size" in chat:
            model_cfg["context_window_size"] = chat["context_window_size"]
        config = _llama_config(model_cfg, root)
        return ModelArtifact(root, "mlc", config, _with_activations(stored, activations), chat)
    if (root / "config.json").exists():
        cfg = formats.read_json_object(root / "config.json")
        quant = _with_activations(quantization or "q0f32", activations)
        return ModelArtifact(root, "hf", _llama_config(cfg, root), quant, cfg)
    raise ModelLoadError(
        f"{root} is neither a Hugging Face checkpoint (config.json) nor an MLC artifact "
        f"({formats.MLC_CHAT_CONFIG})"
    )


def _with_activations(quantization: str, activations: str) -> str:
    if activations == "auto":
        return quantization
    return Scheme.parse(quantization).with_activations(activations).name


def _open_gguf(path: Path, quantization: str | None, activations: str) -> ModelArtifact:
    from .gguf_file import GGUFModel

    if quantization is not None:
        raise ModelLoadError(
            f"{path.name} is a GGUF file: its weights keep the file's formats, so --quantization "
            "does not apply (make another file with llama-quantize instead)"
        )
    model = GGUFModel.open(path)
    config = model.config()
    scheme = model.scheme().with_activations("f32" if activations == "auto" else activations)
    return ModelArtifact(path, "gguf", config, scheme.name, model.summary(), model)


def load_mlc_named(art: ModelArtifact) -> dict[str, npt.NDArray[Any]]:
    """The weights under MLC names (fused, quantized as the artifact says)."""
    from .weights import hf_to_mlc

    if art.format == "gguf":
        log.info("loading GGUF weights from %s (%s)", art.path, art.gguf.tensor_types())
        return dict(art.gguf.weights())
    if art.format == "mlc":
        params, _ = formats.read_mlc_params(art.path)
        return params
    log.info("loading HF weights from %s (%s)", art.path, art.quantization)
    return hf_to_mlc(art.config, formats.read_safetensors(art.path), art.quantization)


def load_params(art: ModelArtifact, infos: list[Any]) -> list[npt.NDArray[Any]]:
    """The packed parameter list for a compiled model's `infos` (compile.CompiledModel.params)."""
    from .weights import mlc_to_params

    try:
        return mlc_to_params(load_mlc_named(art), infos)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{art.path}: weights do not match the model: {exc}") from exc


def gen_config(
    art: ModelArtifact,
    *,
    conv_template: str | None = None,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
) -> dict[str, Any]:
    """mlc-chat-config.json for an HF checkpoint, in mlc-llm's layout."""
    raw = dict(art.raw_config)
    gen = {}
    gen_path = art.path / "generation_config.json"
    if gen_path.exists():
        gen = formats.read_json_object(gen_path)
    ctx = context_window_size or art.config.context_window_size
    model_config = dict(raw)
    model_config["context_window_size"] = ctx
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    return {
        "version": "0.1.0",
        "model_type": art.config.model_type,
        "quantization": art.quantization,
        "model_config": model_config,
        "vocab_size": art.config.vocab_size,
        "context_window_size": ctx,
        "sliding_window_size": art.config.sliding_window or -1,
        "prefill_chunk_size": prefill_chunk_size or min(ctx, 2048),
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "temperature": gen.get("temperature", 1.0),
        "top_p": gen.get("top_p", 1.0),
        "repetition_penalty": gen.get("repetition_penalty", 1.0),
        "conv_template": conv_template or "chatml",
        "pad_token_id": raw.get("pad_token_id", 0) or 0,
        "bos_token_id": gen.get("bos_token_id", raw.get("bos_token_id")),
        "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        "tokenizer_files": [f for f in TOKENIZER_FILES if (art.path / f).exists()],
    }


def convert_weight(
    hf_dir: str | Path,
    quantization: str,
    out_dir: str | Path,
    *,
    conv_template: str | None = None,
) -> Path:
    """Write an MLC artifact (params shards + mlc-chat-config.json + tokenizer files)."""
    art = open_artifact(hf_dir, quantization)
    if art.format != "hf":
        raise ModelLoadError(f"{hf_dir} is already an MLC artifact")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    named = load_mlc_named(art)
    formats.write_mlc_params(out, named, metadata={"quantization": quantization})
    formats.write_mlc_chat_config(out, gen_config(art, conv_template=conv_template))
    for name in TOKENIZER_FILES:
        if (art.path / name).exists():
            shutil.copyfile(art.path / name, out / name)
    log.info("wrote %d tensors (%s) to %s", len(named), quantization, out)
    return out
