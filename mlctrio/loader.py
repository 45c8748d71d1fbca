"""Turn a model string into a factory of (engine core, model info), run on the worker thread.

`mock://echo[?delay_ms=5&num_pages=4096&context_window=4096&load_ms=0&prefix_cache=0&weight_mb=0]`
is the fake engine (load_ms: its load sleeps that long, like a compile; prefix_cache=1: the prefix
cache as --prefix-cache-mode says, else off; weight_mb: the weights it claims to need, for
memory sizing); anything else (`demo://tiny|small`, a
model directory, `HF://org/name`) is served by the TVM runtime.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

from .config import ServerConfig
from .engine.model_info import ModelInfo
from .errors import ConfigError
from .sizing import ModelFootprint, resolve_engine_config
from .worker import Core

CoreFactory = Callable[[], tuple[Core, ModelInfo]]

_ECHO_KEYS = {
    "delay_ms": float,
    "num_pages": int,
    "context_window": int,
    "max_num_sequence": int,
    "load_ms": float,
    "prefix_cache": int,
    "weight_mb": float,
}


def parse_mock_url(model: str) -> dict[str, Any]:
    url = urllib.parse.urlsplit(model)
    if url.netloc != "echo" or url.path not in ("", "/"):
        raise ConfigError(f"unknown mock model {model!r}: only mock://echo exists")
    options: dict[str, Any] = {}
    for key, values in urllib.parse.parse_qs(url.query, keep_blank_values=True).items():
        if key not in _ECHO_KEYS:
            raise ConfigError(f"mock://echo: unknown option {key!r} (known: {sorted(_ECHO_KEYS)})")
        try:
            options[key] = _ECHO_KEYS[key](values[-1])
        except ValueError:
            raise ConfigError(f"mock://echo: {key} must be a number, got {values[-1]!r}") from None
    return options


def _no_draft(config: ServerConfig, engine: Any) -> tuple[Any, Any]:
    raise ConfigError("mock://echo cannot load a draft model: use --speculative-mode ngram")


def core_factory(config: ServerConfig) -> CoreFactory:
    model = config.model
    name = config.model_name
    if model.startswith("mock://"):
        options = parse_mock_url(model)

        def build_echo() -> tuple[Core, ModelInfo]:
            import time

            import attrs

            from .runtime.spec_loader import build_speculator
            from .testing.echo import HIDDEN_SIZE, ByteTokenizer, build_echo_core

            time.sleep(options.get("load_ms", 0.0) / 1000.0)

            footprint = ModelFootprint(
                options.get("context_window", 4096),
                weight_bytes=int(options.get("weight_mb", 0.0) * (1 << 20)),
            )
            engine_config, estimate = resolve_engine_config(config, footprint)
            if "max_num_sequence" in options:
                engine_config = attrs.evolve(
                    engine_config, max_num_sequence=options["max_num_sequence"]
                )
            core, tokenizer, template = build_echo_core(
                delay_s=options.get("delay_ms", 0.0) / 1000.0,
                total_pages=options.get("num_pages", 4096),
                max_num_sequence=engine_config.max_num_sequence,
                context_window_size=engine_config.context_window_size,
                prefill_chunk_size=engine_config.prefill_chunk_size,
                prefix_cache_mode=(
                    engine_config.prefix_cache_mode if options.get("prefix_cache") else "disable"
                ),
                speculator=build_speculator(
                    config, engine_config, ByteTokenizer(), ByteTokenizer().vocab_size, _no_draft
                ),
            )
            info = ModelInfo(
                model_id=name,
                context_window_size=engine_config.context_window_size,
                tokenizer=tokenizer,
                chat_template=template,
                config={**attrs.asdict(engine_config), "memory": attrs.asdict(estimate)},
                limits=core.scheduler.limits,
                hidden_size=HIDDEN_SIZE,
            )
            return core, info

        return build_echo

    def build_tvm() -> tuple[Core, ModelInfo]:
        from .runtime.model_loader import load_model

        return load_model(config)

    return build_tvm
