"""Configuration values: the engine's (mirrors mlc_llm's EngineConfig) and the server's.

Parsed from the command line (cli.py) or from MLCTRIO_* environment variables (app.py); both end
in the same frozen values, so the two ways of starting the server behave the same.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import attrs

from .errors import ConfigError

Mode = Literal["local", "interactive", "server"]
PrefixCacheMode = Literal["radix", "disable"]
SpeculativeMode = Literal["disable", "small_draft", "eagle", "medusa", "ngram"]
SPECULATIVE_MODES: tuple[str, ...] = ("disable", "small_draft", "eagle", "medusa", "ngram")
#: modes whose drafts read the served model's hidden states (it is compiled with them)
HEAD_MODES: tuple[str, ...] = ("medusa", "eagle")
#: modes whose first --additional-models entry drafts instead of being served (mlc_llm's way):
#: small_draft's draft model; medusa's or eagle's heads (optional: shipped ones are found)
DRAFTING_MODES: tuple[str, ...] = ("small_draft", *HEAD_MODES)
#: `--reasoning-parser` (vLLM's names): auto parses `<think>` blocks when the chat template
#: mentions `<think>`; deepseek_r1 and qwen3 always do; none never does (server/reasoning.py).
ReasoningParser = Literal["auto", "none", "deepseek_r1", "qwen3"]
REASONING_PARSERS: tuple[str, ...] = ("auto", "none", "deepseek_r1", "qwen3")


@attrs.frozen
class EngineOverrides:
    """`--overrides "k=v;k=v"`: each None field keeps the mode's choice."""

    max_num_sequence: int | None = None
    max_total_seq_length: int | None = None
    prefill_chunk_size: int | None = None
    max_single_sequence_length: int | None = None
    gpu_memory_utilization: float | None = None
    context_window_size: int | None = None
    sliding_window_size: int | None = None
    attention_sink_size: int | None = None
    tensor_parallel_shards: int | None = None
    pipeline_parallel_stages: int | None = None
    max_history_size: int | None = None
    prefix_cache_max_num_recycling_seqs: int | None = None
    kv_page_size: int | None = None
    num_threads: int | None = None
    max_prefill_tokens_while_decoding: int | None = None  # mlctrio's own (EngineConfig)
    spec_draft_length: int | None = None  # 0: adaptive
    spec_tree_width: int | None = None
    spec_max_batch: int | None = None  # mlctrio's own (EngineConfig)

    @classmethod
    def parse(cls, text: str) -> EngineOverrides:
        """Parse "k=v;k=v" (mlc_llm's format). Unknown keys and bad values raise ConfigError."""
        fields = {f.name: f for f in attrs.fields(cls)}
        values: dict[str, int | float] = {}
        for item in text.split(";"):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ConfigError(f"--overrides: expected key=value, got {item!r}")
            key, _, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"--overrides: unknown key {key!r} (known: {known})")
            kind = float if key == "gpu_memory_utilization" else int
            try:
                value = kind(raw.strip())
            except ValueError:
                raise ConfigError(
                    f"--overrides: {key} must be {kind.__name__}, got {raw.strip()!r}"
                ) from None
            if key == "gpu_memory_utilization":
                if not 0.0 < value <= 1.0:
                    raise ConfigError("--overrides: gpu_memory_utilization must be in (0, 1]")
            elif key == "spec_draft_length" and value < 0:
                raise ConfigError("--overrides: spec_draft_length must be >= 0 (0: adaptive)")
            elif value <= 0 and key not in (
                "sliding_window_size",
                "attention_sink_size",
                "spec_draft_length",
            ):
                raise ConfigError(f"--overrides: {key} must be positive, got {value}")
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]


@attrs.frozen
class EngineConfig:
    """The resolved engine configuration (served at /debug/config)."""

    model: str
    mode: Mode = "local"
    max_num_sequence: int = 4
    max_total_seq_length: int = 8192
    prefill_chunk_size: int = 2048
    context_window_size: int = 2048
    kv_page_size: int = 16
    gpu_memory_utilization: float = 0.85
    prefix_cache_mode: PrefixCacheMode = "radix"
    prefix_cache_max_num_recycling_seqs: int = 16
    num_threads: int | None = None
    #: Prompt tokens a step may carry while requests are decoding (engine/scheduler.py): on a
    #: CPU a step of 2048 prompt tokens takes seconds, and every running stream waits for it.
    max_prefill_tokens_while_decoding: int = 256
    #: Speculative decoding (runtime/speculative.py): the mode, the draft length (0: adaptive
    #: per choice), and the most decoding choices a step may have and still draft (by mode,
    #: sizing.SPEC_MAX_BATCH, unless overridden).
    speculative_mode: SpeculativeMode = "disable"
    spec_draft_length: int = 0
    spec_max_batch: int = 4


@attrs.frozen
class ModelSpec:
    """One more model to serve (`--additional-models MODEL[:NAME]`): the model string, as the
    positional MODEL takes it, and the name clients send (default: `default_served_name`)."""

    model: str
    served_name: str | None = None

    @property
    def name(self) -> str:
        return self.served_name or default_served_name(self.model)

    @classmethod
    def parse(cls, text: str, *, exists: Callable[[str], bool] = os.path.exists) -> ModelSpec:
        """`MODEL[:NAME]`. MODEL may hold `:` itself (`demo://tiny`, `mock://echo?x=1`, a path),
        so NAME is split off only at the last `:`, only when what follows has no `/` and what
        precedes is still a model string (not a bare scheme like `demo`), and never when the
        whole text is an existing path."""
        text = text.strip()
        if not text:
            raise ConfigError("an empty model string")
        model, sep, name = text.rpartition(":")
        if not sep or "/" in name or not _is_model_string(model) or exists(text):
            return cls(text)
        if not name:
            raise ConfigError(f"{text!r}: empty served name after ':'")
        return cls(model, name)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _is_model_string(text: str) -> bool:
    """Whether `text` can be a model string on its own: not empty, and not cut inside a URL
    scheme (`demo`, `mock://`: a scheme with nothing after it)."""
    if not text or _SCHEME.fullmatch(text):
        return False
    _, sep, rest = text.partition("://")
    return not sep or bool(rest.strip("/"))


@attrs.frozen
class ServerConfig:
    """Everything `mlctrio serve` / `hypercorn mlctrio.app:app` is configured with."""

    model: str
    model_lib: str | None = None
    quantization: str | None = None  # for HF checkpoints; an MLC artifact says its own
    activations: str = "auto"  # f32 | q8 | auto: see models/quantization.py
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    mode: Mode = "local"
    overrides: EngineOverrides = attrs.field(factory=EngineOverrides)
    prefix_cache_mode: PrefixCacheMode = "radix"
    speculative_mode: SpeculativeMode = "disable"
    #: small_draft's draft model (the first --additional-models entry in that mode): its
    #: engine is the main model's, so it is not served under a name of its own
    draft_model: ModelSpec | None = None
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    api_keys: tuple[str, ...] = ()
    enable_debug: bool = False
    enable_tracing: bool = False
    served_model_name: str | None = None
    max_queued_requests: int = 256
    request_timeout_s: float | None = None
    shutdown_timeout_s: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    log_level: str = "info"
    access_log: bool = False  # one log line per request (--access-log, MLCTRIO_ACCESS_LOG=1)
    vllm_metrics: bool = False  # also vllm:* names on /metrics (--vllm-metrics): metrics_vllm.py
    disable_chat_page: bool = False  # no chat page at / (--disable-chat-page): routes_page.py
    reasoning_parser: ReasoningParser = "auto"  # --reasoning-parser: server/reasoning.py
    trace_buffer_size: int = 100_000
    #: More models served by the same server, each with its own engine (--additional-models).
    additional_models: tuple[ModelSpec, ...] = ()
    #: Bytes this model may take (weights + KV cache + workspace), when the server decided it
    #: (several models share the memory: model_loads.py); None: a share of the memory available.
    memory_budget_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        names = [self.model_name, *(spec.name for spec in self.additional_models)]
        sources = [self.model, *(spec.model for spec in self.additional_models)]
        for k, name in enumerate(names):
            if name in names[:k]:
                first = sources[names.index(name)]
                raise ConfigError(
                    f"two models are served as {name!r} ({first} and {sources[k]}): "
                    "give one another name with MODEL:NAME"
                )

    @property
    def model_name(self) -> str:
        return self.served_model_name or default_served_name(self.model)

    @property
    def served_names(self) -> tuple[str, ...]:
        """The names clients may send, the main model's first."""
        return (self.model_name, *(spec.name for spec in self.additional_models))

    def model_configs(self) -> tuple[ServerConfig, ...]:
        """One configuration per served model, the main one (this) first. Additional models
        share every setting but the model, its name and `--model-lib` (the main model's)."""
        base = attrs.evolve(self, model_lib=None, additional_models=(), draft_model=None)
        if self.speculative_mode in DRAFTING_MODES:  # its drafts are for MODEL only
            base = attrs.evolve(base, speculative_mode="disable")
        more = [
            attrs.evolve(base, model=s.model, served_model_name=s.name)
            for s in self.additional_models
        ]
        return (self, *more)


def cache_root() -> Path:
    """Where mlctrio keeps what it builds (demo models, compiled libraries, bench builds):
    $MLCTRIO_CACHE_DIR, else ~/.cache/mlctrio. Read when called, so tests can redirect it."""
    env = os.environ.get("MLCTRIO_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/mlctrio").expanduser()


def default_served_name(model: str) -> str:
    """The model id clients send when --served-model-name is not given: the model string as
    given, without a mock:// URL's options (so `mock://echo?delay_ms=5` is served as
    `mock://echo`) and without the embedded:// scheme (`embedded://SmolLM2-135M-Instruct` is
    served as `SmolLM2-135M-Instruct`)."""
    if model.startswith("mock://"):
        return model.split("?", 1)[0]
    if model.startswith("embedded://"):
        return model[len("embedded://") :]
    return model
