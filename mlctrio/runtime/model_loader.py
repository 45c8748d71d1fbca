"""Load a served model: resolve it, compile (or reuse) its library, read weights, build the core.

Runs on the engine worker thread (loading is slow and must not block the event loop). Every step
is logged, including whether the compiled library came from the cache, the resolved engine config
and the memory estimate. A library is checked against the model it is to serve (its build info:
config and quantization) before any weights load: a `--model-lib` built for another model is a
ModelLoadError naming both, never a server that reports ready and then fails every request.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..config import HEAD_MODES, EngineConfig, ServerConfig
from ..engine.model_info import ModelInfo
from ..errors import ConfigError, ModelLoadError
from ..models import hub
from ..models.artifact import ModelArtifact, load_params, open_artifact
from ..models.cache_files import check_record
from ..models.fetch import EMBEDDED_SCHEME, ensure_embedded
from ..models.quantization import summary
from ..sizing import ModelFootprint, resolve_engine_config, served_context_window
from .chat_template import load_chat_template
from .constraints import ConstraintCompiler
from .core import EngineCore
from .pooling import detect_pooling
from .sampler import sampling_vocab_size
from .spec_loader import build_speculator
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEMO_SCHEME = "demo://"


def resolve_model_dir(model: str) -> Path:
    """A local path for `embedded://NAME` (fetched on first use), `demo://tiny|small`,
    `HF://org/name` (downloaded when not cached) or a path (directory or GGUF file)."""
    if model.startswith(EMBEDDED_SCHEME):
        return ensure_embedded(model)
    if model.startswith(DEMO_SCHEME):
        from ..models.demo import PRESETS, ensure_demo_model

        preset = model[len(DEMO_SCHEME) :]
        if preset not in PRESETS:
            raise ConfigError(f"unknown demo preset {preset!r} (known: {sorted(PRESETS)})")
        return ensure_demo_model(preset)
    return hub.resolve_model_path(model)


def footprint(art: ModelArtifact, param_infos: list[Any]) -> ModelFootprint:
    c = art.config
    weight_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in param_infos)
    return ModelFootprint(
        context_window_size=c.context_window_size,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        kv_window=c.kv_window[0] if c.kv_window else None,
    )


def detect_tool_call_format(template: Any) -> str:
    """The model's tool-call text format: the one its chat template renders calls in (both
    template kinds know it), so the parser reads what the prompt showed (hermes otherwise)."""
    return str(getattr(template, "call_format", "hermes"))


def renders_tools(template: Any) -> bool:
    """Whether the chat template renders `tools` itself (else mlctrio injects the tool prompt)."""
    caps = getattr(template, "caps", None)
    return bool(caps().renders_tools) if caps is not None else True


def tokenizer_and_template(art: ModelArtifact) -> tuple[Any, Any]:
    """The tokenizer and chat template: from a GGUF file's metadata, else the model directory."""
    if art.format == "gguf":
        from .gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(art.gguf.metadata)
        return tokenizer, chat_template_from_gguf(art.gguf.metadata, tokenizer)
    tokenizer = load_tokenizer(art.path)
    return tokenizer, load_chat_template(art.path, tokenizer)


def model_library(
    config: ServerConfig, art: ModelArtifact
) -> tuple[Path, list[Any], dict[str, Any]]:
    """(library, its param infos, how it was obtained): --model-lib, else compiled or cached."""
    from ..models.compile import compile_model
    from ..models.weights import param_infos

    if config.device == "cuda":
        # The CUDA library compiles from the same definition (`mlctrio compile --device cuda`),
        # but the runner drives the KV cache and weights on the CPU: refuse rather than ignore.
        raise ConfigError("--device cuda: serving on a GPU is not implemented yet; use cpu")
    if config.device not in ("auto", "cpu", "llvm"):
        raise ConfigError(f"--device {config.device!r}: expected auto or cpu")
    if config.model_lib is not None:
        lib = Path(config.model_lib)
        if not lib.is_file():
            raise ModelLoadError(f"--model-lib {lib} does not exist")
        problem = _beside_record_problem(lib)
        if problem is not None:  # checked before dlopen: a truncated library SIGBUSes
            raise ModelLoadError(f"--model-lib {lib} is corrupt: {problem}")
        log.info("using model library %s", lib)
        infos = param_infos(art.config, art.quantization)
        return lib, infos, {"library": str(lib), "source": "--model-lib"}
    compiled = compile_model(art.config, art.quantization)
    source = "cache" if compiled.cache_hit else "compiled"
    info = {"library": str(compiled.lib_path), "source": source,
            "compile_s": round(compiled.compile_s, 2)}  # fmt: skip
    return compiled.lib_path, compiled.params, info


def _beside_record(lib: Path) -> dict[str, Any] | None:
    """The metadata `.json` beside a library (a compile-cache entry or a copy of one), if any."""
    try:
        meta = json.loads(lib.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _beside_record_problem(lib: Path) -> str | None:
    meta = _beside_record(lib)
    if meta is None or "sha256" not in meta:
        return None
    return check_record(lib, meta)


def check_library(module: Any, lib: Path, art: ModelArtifact, what: str, model: str) -> None:
    """Refuse a library whose build info names another config or quantization than `art`'s.
    The info comes from the library itself, else from the metadata `.json` beside it."""
    from ..models.build_info import build_mismatch
    from .tvm_library import library_build_info

    info = library_build_info(module) or _beside_record(lib)
    if info is None:
        raise ModelLoadError(
            f"{what} {lib} carries no build info (compiled by an older mlctrio?): "
            "recompile it with `mlctrio compile`"
        )
    problem = build_mismatch(info, art.config, art.quantization)
    if info.get("target_kind", "llvm") != "llvm":
        problem = f"it was compiled for {info['target_kind']}; serving runs on the CPU"
    if problem is not None:
        raise ModelLoadError(f"{what} {lib} does not match the model {model}: {problem}")


def served_artifact(art: ModelArtifact, config: ServerConfig) -> ModelArtifact:
    """`art` with the config this server runs: LongRoPE (Phi-3) picks its factor set from the
    served context window, once (LlamaConfig.for_context_window; docs/discussion/0010), and
    `--overrides sliding_window_size=N` sets the window (LlamaConfig.with_sliding_window),
    `attention_sink_size=N` the sinks beside it (with_attention_sinks)."""
    window = served_context_window(config.overrides, art.config.context_window_size)
    served = art.config.for_context_window(window)
    if served is not art.config:
        log.info("LongRoPE: short factors for the served context window of %d tokens", window)
    sliding = config.overrides.sliding_window_size
    if sliding is not None and sliding > 0:
        served = served.with_sliding_window(sliding)
        log.info("sliding window of %d positions (--overrides sliding_window_size)", sliding)
    sink = config.overrides.attention_sink_size
    if sink is not None and sink > 0:
        try:
            served = served.with_attention_sinks(sink)
        except ValueError as exc:
            raise ConfigError(f"--overrides attention_sink_size={sink}: {exc}") from None
        log.info("attention sinks: the first %d positions (--overrides attention_sink_size)", sink)
    if config.speculative_mode in HEAD_MODES:  # their heads read the hidden states
        served = served.with_hidden_outputs()
    if served.kv_window:
        kept, sink = served.kv_window
        log.info(
            "KV cache keeps a sequence's last %d positions (and %d sinks) once it passes them",
            kept - sink,
            sink,
        )
    return art if served is art.config else attrs.evolve(art, config=served)


def load_model(config: ServerConfig) -> tuple[EngineCore, ModelInfo]:
    from .tvm_library import load_library
    from .tvm_runner import TVMRunner

    path = resolve_model_dir(config.model)
    art = served_artifact(open_artifact(path, config.quantization, config.activations), config)
    log.info(
        "model %s: %s format, %s, %s",
        config.model,
        art.format,
        summary(art.quantization),
        art.config.summary(),
    )
    tokenizer, template = tokenizer_and_template(art)
    lib, infos, compile_info = model_library(config, art)
    module = load_library(lib)
    what = "--model-lib" if config.model_lib else "compiled library"
    check_library(module, lib, art, what, config.model)
    engine_config, estimate = resolve_engine_config(config, footprint(art, infos))
    if engine_config.prefill_chunk_size < engine_config.max_num_sequence:
        raise ConfigError(
            f"prefill_chunk_size={engine_config.prefill_chunk_size} must be at least "
            f"max_num_sequence={engine_config.max_num_sequence}: one step decodes every sequence"
        )
    log.info("engine config: %s", engine_config)
    log.info("memory estimate: %s", estimate.describe())
    params = load_params(art, infos)
    runner = TVMRunner(
        module,
        params,
        art.config,
        max_num_sequence=engine_config.max_num_sequence,
        max_total_seq_length=engine_config.max_total_seq_length,
        prefill_chunk_size=engine_config.prefill_chunk_size,
        page_size=engine_config.kv_page_size,
        num_threads=engine_config.num_threads,
    )
    constraints = ConstraintCompiler(
        tokenizer, art.config.vocab_size, stop_token_ids=template.stop_token_ids
    )
    core = EngineCore(
        runner,
        tokenizer,
        engine_config,
        extra_stop_token_ids=template.stop_token_ids,
        constraints=constraints,
        speculator=build_speculator(
            config,
            engine_config,
            tokenizer,
            sampling_vocab_size(runner.vocab_size, tokenizer),
            load_draft,
            runner,
        ),
    )
    info = ModelInfo(
        model_id=config.model_name,
        context_window_size=engine_config.context_window_size,
        tokenizer=tokenizer,
        chat_template=template,
        check_constraint=constraints.check,
        limits=core.scheduler.limits,
        tool_call_format=detect_tool_call_format(template),
        parallel_tool_calls=renders_tools(template),
        hidden_size=art.config.hidden_size,
        pooling=detect_pooling(art.path, art.gguf.metadata if art.gguf is not None else None),
        config={
            **attrs.asdict(engine_config),
            "model_path": str(path),
            "format": art.format,
            "quantization": art.quantization,
            "memory": attrs.asdict(estimate),
            "memory_summary": estimate.describe(),
            **compile_info,
        },
    )
    return core, info


def load_draft(config: ServerConfig, engine: EngineConfig) -> tuple[Any, Any]:
    """small_draft's draft model (config.draft_model): its runner, sized like the target's
    engine (sequences, chunk, pages; KV for spec_max_batch contexts), and its tokenizer."""
    from .tvm_library import load_library
    from .tvm_runner import TVMRunner

    assert config.draft_model is not None
    model = config.draft_model.model
    # The draft's precision cannot change the output (the target verifies every token), so
    # "auto" picks the fast int8-activation kernels for it.
    activations = "q8" if config.activations == "auto" else config.activations
    art = open_artifact(resolve_model_dir(model), config.quantization, activations)
    art = served_artifact(art, config)  # LongRoPE: the factor set of the served window
    draft_config = attrs.evolve(
        config, model=model, model_lib=None, additional_models=(), activations=activations
    )
    tokenizer, _ = tokenizer_and_template(art)
    lib, infos, _ = model_library(draft_config, art)
    module = load_library(lib)
    check_library(module, lib, art, "draft model library", model)
    log.info("draft model %s: %s format, %s", model, art.format, summary(art.quantization))
    runner = TVMRunner(
        module,
        load_params(art, infos),
        art.config,
        max_num_sequence=engine.max_num_sequence,
        # the draft holds KV only for the choices that draft: at most spec_max_batch contexts
        max_total_seq_length=min(
            engine.max_total_seq_length,
            engine.spec_max_batch * min(engine.context_window_size, art.config.context_window_size),
        ),
        prefill_chunk_size=engine.prefill_chunk_size,
        page_size=engine.kv_page_size,
        num_threads=engine.num_threads,
    )
    return runner, tokenizer
