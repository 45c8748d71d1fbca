"""`hypercorn -k trio mlctrio.app:app`: the same app as `mlctrio serve`, configured from MLCTRIO_*.

Each environment variable stands for the `mlctrio serve` flag of the same name, parsed by the same
parser, so both ways of starting behave the same:

    MLCTRIO_MODEL (positional MODEL, same default)   MLCTRIO_MODEL_LIB    MLCTRIO_DEVICE
    MLCTRIO_MODE          MLCTRIO_OVERRIDES          MLCTRIO_PREFIX_CACHE_MODE
    MLCTRIO_SPECULATIVE_MODE   MLCTRIO_REASONING_PARSER
    MLCTRIO_ALLOW_ORIGINS / _ALLOW_METHODS / _ALLOW_HEADERS (JSON lists)
    MLCTRIO_ALLOW_CREDENTIALS=1
    MLCTRIO_API_KEY (several separated by commas)   MLCTRIO_API_KEY_FILE
    MLCTRIO_ENABLE_DEBUG=1   MLCTRIO_ENABLE_TRACING=1   MLCTRIO_SERVED_MODEL_NAME
    MLCTRIO_MAX_QUEUED_REQUESTS   MLCTRIO_REQUEST_TIMEOUT   MLCTRIO_SHUTDOWN_TIMEOUT
    MLCTRIO_MAX_BODY_BYTES   MLCTRIO_LOG_LEVEL   MLCTRIO_ACCESS_LOG=1   MLCTRIO_VLLM_METRICS=1
    MLCTRIO_DISABLE_CHAT_PAGE=1
    MLCTRIO_ADDITIONAL_MODELS (MODEL[:NAME] entries separated by spaces or commas)
    MLCTRIO_EMBEDDING_MODEL

Host and port are Hypercorn's (`--bind`). On SIGTERM Hypercorn stops accepting and waits its
graceful timeout; then it cuts the connections still open (each cut stream ends with an error
event and `[DONE]`: server/asgi.py), and the app's lifespan shutdown aborts what is left and joins
the engine threads (a model still loading is abandoned: its thread is not waited for). With
`-w 0` Hypercorn installs no signal handler: SIGTERM ends the process at once.

Failures end the process, so that Hypercorn does not serve "loading" forever nor restart a
worker that cannot work: a bad MLCTRIO_* value at import is one `mlctrio: error: ...` line and
exit status 2; a model that fails to load (or an engine that dies) is one ERROR log line, naming
that model, and exit status 1 (`exit_now`: Hypercorn's lifespan only logs an error raised after
startup, and startup cannot wait for a load of minutes: /health says 503 "loading" meanwhile).

Logging is set up when the app starts serving, not at import: the "mlctrio" loggers write to
stderr at MLCTRIO_LOG_LEVEL unless logging is configured already (Hypercorn's --log-config: the
root logger or "mlctrio" has a handler; Hypercorn's default logging touches neither); the
"ready" line comes once every model is loaded (one after another); MLCTRIO_ACCESS_LOG=1 logs
each request as `mlctrio serve --access-log` does (Hypercorn's own --access-logfile works too,
in its format).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import trio
from quart_trio import QuartTrio

from .cli import RaisingParser, build_parser, config_from_args, configure_logging
from .config import ServerConfig
from .errors import MlctrioError
from .model_loads import ModelSet, one_line
from .serve import add_access_log, exit_now, serve_engines_announced
from .server.app import create_app
from .service import shut_down

log = logging.getLogger("mlctrio")

_VALUE_FLAGS = (
    "model_lib",
    "quantization",
    "activations",
    "device",
    "mode",
    "overrides",
    "prefix_cache_mode",
    "speculative_mode",
    "reasoning_parser",
    "allow_origins",
    "allow_methods",
    "allow_headers",
    "api_key_file",
    "served_model_name",
    "embedding_model",
    "max_queued_requests",
    "request_timeout",
    "shutdown_timeout",
    "max_body_bytes",
    "log_level",
)
_SWITCHES = (
    "allow_credentials",
    "enable_debug",
    "enable_tracing",
    "access_log",
    "vllm_metrics",
    "disable_chat_page",
)


def config_from_env(env: Mapping[str, str]) -> ServerConfig:
    argv = ["serve"]
    if env.get("MLCTRIO_MODEL"):
        argv.append(env["MLCTRIO_MODEL"])
    for name in _VALUE_FLAGS:
        value = env.get(f"MLCTRIO_{name.upper()}")
        if value:
            argv += [f"--{name.replace('_', '-')}", value]
    for name in _SWITCHES:
        if env.get(f"MLCTRIO_{name.upper()}", "").lower() in ("1", "true", "yes", "on"):
            argv.append(f"--{name.replace('_', '-')}")
    for key in env.get("MLCTRIO_API_KEY", "").split(","):
        if key.strip():
            argv += ["--api-key", key.strip()]
    more = env.get("MLCTRIO_ADDITIONAL_MODELS", "").replace(",", " ").split()
    if more:
        argv += ["--additional-models", *more]
    return config_from_args(build_parser(RaisingParser).parse_args(argv))


def create_app_from_env(env: Mapping[str, str] | None = None) -> QuartTrio:
    config = config_from_env(os.environ if env is None else env)
    models = ModelSet.build(config)
    # The lifespan runs the engines as create_app(own_engine=True) would, and says when ready.
    app = create_app(
        config, models.engines[0], additional_engines=models.engines[1:], own_engine=False
    )
    if config.access_log:
        add_access_log(app)
    stopping = trio.Event()

    async def run_engine() -> None:
        loaded = False
        try:
            try:
                loaded = await models.load_all(stopping)
            finally:  # stopped while loading (by `stopping` or by Quart cancelling the task)
                if models.abandoned:
                    log.info("stopped before %s was loaded", ", ".join(models.names))
                    exit_now(0)  # the load's thread may still run: no interpreter teardown
            await serve_engines_announced(models)
        except Exception as exc:  # a group of them too; not Cancelled (a BaseException)
            leaf = _first_error(exc)
            if not loaded:
                failed = models.failed_model() or config.model
                log.error("cannot load %s: %s", failed, one_line(leaf))
            else:  # the engine died while serving: a bug, its traceback helps
                log.error("engine failed: %s", one_line(leaf), exc_info=exc)
            exit_now(1)

    @app.before_serving
    async def _start_engine() -> None:
        if not (logging.getLogger().handlers or log.handlers):  # else --log-config did it
            configure_logging(config.log_level, logger="mlctrio")
        # start_soon, not start: Hypercorn serves (/health 503) while the model loads.
        app.nursery.start_soon(run_engine)

    @app.after_serving
    async def _stop_engine() -> None:
        stopping.set()  # a load still running is abandoned
        for engine in models.engines:
            shut_down(engine)

    return app


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _app_or_exit() -> QuartTrio:
    """The app, or (a bad MLCTRIO_* value) one line on stderr and exit status 2."""
    try:
        return create_app_from_env()
    except MlctrioError as exc:
        print(f"mlctrio: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_or_exit()
