"""Turn a model string into a factory of (engine core, model info), run on the worker thread.

`mock://echo[?delay_ms=5&num_pages=4096&context_window=4096]` is the fake engine; anything else is
a model directory / HF:// id served by the TVM runtime.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

from .config import EngineConfig, ServerConfig
from .errors import ConfigError
from .service import Core, ModelInfo

CoreFactory = Callable[[], tuple[Core, ModelInfo]]

_ECHO_KEYS = {"delay_ms": float, "num_pages": int, "context_window": int, "max_num_sequence": int}


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


def resolve_engine_config(config: ServerConfig, context_window: int) -> EngineConfig:
    """The mode's choices, then --overrides on top (as mlc_llm serve does)."""
    o = config.overrides
    ctx = o.context_window_size or context_window
    by_mode = {"interactive": 1, "local": 4, "server": 64}
    max_num_sequence = o.max_num_sequence or by_mode[config.mode]
    total = o.max_total_seq_length or (
        ctx if config.mode == "interactive" else min(ctx * max_num_sequence, 65536)
    )
    if total < ctx and o.max_total_seq_length is not None:
        raise ConfigError(
            f"max_total_seq_length={total} is smaller than the context window ({ctx}): "
            "a single full-length request could never run."
        )
    return EngineConfig(
        model=config.model,
        mode=config.mode,
        max_num_sequence=max_num_sequence,
        max_total_seq_length=max(total, ctx),
        prefill_chunk_size=o.prefill_chunk_size or min(2048, ctx),
        context_window_size=ctx,
        kv_page_size=o.kv_page_size or 16,
        gpu_memory_utilization=o.gpu_memory_utilization or 0.85,
        prefix_cache_mode=config.prefix_cache_mode,
        num_threads=o.num_threads,
    )


def core_factory(config: ServerConfig) -> CoreFactory:
    model = config.model
    name = config.model_name
    if model.startswith("mock://"):
        options = parse_mock_url(model)

        def build_echo() -> tuple[Core, ModelInfo]:
            import attrs

            from .testing.echo import build_echo_core

            engine_config = resolve_engine_config(config, options.get("context_window", 4096))
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
            )
            info = ModelInfo(
                model_id=name,
                context_window_size=engine_config.context_window_size,
                tokenizer=tokenizer,
                chat_template=template,
                config=attrs.asdict(engine_config),
            )
            return core, info

        return build_echo
    raise ConfigError(
        f"cannot serve {model!r}: the TVM engine is not wired into the server yet "
        "(only mock://echo is available)"
    )
