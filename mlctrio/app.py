"""`hypercorn -k trio mlctrio.app:app`: the same app as `mlctrio serve`, configured from MLCTRIO_*.

Each environment variable stands for the `mlctrio serve` flag of the same name, parsed by the same
parser, so both ways of starting behave the same:

    MLCTRIO_MODEL (positional MODEL, default mock://echo)   MLCTRIO_MODEL_LIB    MLCTRIO_DEVICE
    MLCTRIO_MODE          MLCTRIO_OVERRIDES          MLCTRIO_PREFIX_CACHE_MODE
    MLCTRIO_ALLOW_ORIGINS / _ALLOW_METHODS / _ALLOW_HEADERS (JSON lists)
    MLCTRIO_ALLOW_CREDENTIALS=1
    MLCTRIO_API_KEY (several separated by commas)   MLCTRIO_API_KEY_FILE
    MLCTRIO_ENABLE_DEBUG=1   MLCTRIO_ENABLE_TRACING=1   MLCTRIO_SERVED_MODEL_NAME
    MLCTRIO_MAX_QUEUED_REQUESTS   MLCTRIO_REQUEST_TIMEOUT   MLCTRIO_SHUTDOWN_TIMEOUT
    MLCTRIO_MAX_BODY_BYTES   MLCTRIO_LOG_LEVEL   MLCTRIO_ACCESS_LOG=1

Host and port are Hypercorn's (`--bind`). On SIGTERM Hypercorn stops accepting, waits its graceful
timeout, then the app's lifespan shutdown aborts what is left and joins the engine thread.

Logging is set up when the app starts serving, not at import: the "mlctrio" loggers write to
stderr at MLCTRIO_LOG_LEVEL unless logging is configured already (Hypercorn's --log-config); the
model's "ready" line comes once it is loaded; MLCTRIO_ACCESS_LOG=1 logs each request as
`mlctrio serve --access-log` does (Hypercorn's own --access-logfile works too, in its format).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from quart_trio import QuartTrio

from .cli import build_parser, config_from_args, configure_logging
from .config import ServerConfig
from .loader import core_factory
from .serve import add_access_log, serve_engine_announced
from .server.app import create_app
from .service import AsyncEngine, EngineState, stop_engine

_VALUE_FLAGS = (
    "model_lib",
    "quantization",
    "activations",
    "device",
    "mode",
    "overrides",
    "prefix_cache_mode",
    "allow_origins",
    "allow_methods",
    "allow_headers",
    "api_key_file",
    "served_model_name",
    "max_queued_requests",
    "request_timeout",
    "shutdown_timeout",
    "max_body_bytes",
    "log_level",
)
_SWITCHES = ("allow_credentials", "enable_debug", "enable_tracing", "access_log")


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
    return config_from_args(build_parser().parse_args(argv))


def create_app_from_env(env: Mapping[str, str] | None = None) -> QuartTrio:
    config = config_from_env(os.environ if env is None else env)
    engine = AsyncEngine(config.max_queued_requests, core_factory(config))
    # The lifespan runs the engine as create_app(own_engine=True) would, and says when it is ready.
    app = create_app(config, engine, own_engine=False)
    if config.access_log:
        add_access_log(app)

    @app.before_serving
    async def _start_engine() -> None:
        if not logging.getLogger().handlers:  # else Hypercorn's --log-config has set it up
            configure_logging(config.log_level, logger="mlctrio")
        # start_soon, not start: Hypercorn serves (/health 503) while the model loads.
        app.nursery.start_soon(serve_engine_announced, engine, config)

    @app.after_serving
    async def _stop_engine() -> None:
        engine.state = EngineState.DRAINING
        engine.abort_all("shutdown")
        stop_engine(engine)

    return app


app = create_app_from_env()
