"""`mlctrio convert-weight FILE.gguf -o OUT`: a GGUF file as an MLC artifact directory.

The artifact holds exactly what serving the GGUF file serves: the weights as stored (the file's
formats, gguf_quants' conversions, MLC names: params_shard_*.bin + tensor-cache.json), the
storage scheme as mlc-chat-config.json's `quantization` (with `act=f32`, as GGUF files are served),
the hyper-parameters as `model_config`, and the tokenizer the file describes written as a
`tokenizer.json` (HF tokenizers) plus a `tokenizer_config.json` carrying the chat template(s),
the BOS/EOS strings and add_bos. `mlctrio serve OUT` then loads it like any MLC artifact, without
the gguf package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..models import formats
from ..models.artifact import load_mlc_named, open_artifact
from .tokenizer import HFTokenizer

log = logging.getLogger(__name__)


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Write the MLC artifact of a GGUF file into `out_dir` (created); returns it."""
    from .gguf_tokenizer import tokenizer_from_gguf

    art = open_artifact(path)
    if art.format != "gguf":
        raise ModelLoadError(f"{path} is not a GGUF file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    named = load_mlc_named(art)
    formats.write_mlc_params(out, named, metadata={"quantization": art.quantization})
    meta = art.gguf.metadata
    tokenizer = tokenizer_from_gguf(meta)
    files = _write_tokenizer(tokenizer, meta, out)
    model_config = {**art.config.to_dict(), "model_type": art.config.model_type}
    bos = tokenizer.bos_token_id
    formats.write_mlc_chat_config(
        out,
        {
            "version": "0.1.0",
            "model_type": art.config.model_type,
            "quantization": art.quantization,
            "model_config": model_config,
            "vocab_size": art.config.vocab_size,
            "context_window_size": art.config.context_window_size,
            "prefill_chunk_size": min(art.config.context_window_size, 2048),
            "conv_template": "chatml",  # unused: tokenizer_config.json carries the template
            "bos_token_id": bos,
            "eos_token_id": list(tokenizer.eos_token_ids),
            "tokenizer_files": files,
        },
    )
    log.info("wrote %d tensors (%s) and the tokenizer to %s", len(named), art.quantization, out)
    return out


def _write_tokenizer(tokenizer: HFTokenizer, meta: dict[str, Any], out: Path) -> list[str]:
    backend = getattr(tokenizer.backend, "tok", None)
    if backend is None:
        raise ModelLoadError("this GGUF tokenizer has no tokenizer.json form")
    backend.save(str(out / "tokenizer.json"))

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.id_to_token(token_id)

    templates = {k.removeprefix("tokenizer.chat_template"): v for k, v in meta.items()
                 if k.startswith("tokenizer.chat_template") and isinstance(v, str)}  # fmt: skip
    named = [{"name": k.lstrip(".") or "default", "template": v} for k, v in templates.items()]
    config: dict[str, Any] = {
        "bos_token": text(tokenizer.bos_token_id),
        "eos_token": text(tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None),
        "add_bos_token": bool(tokenizer.add_bos_token),
    }
    if named:
        config["chat_template"] = named[0]["template"] if len(named) == 1 else named
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
