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
    MLCTRIO_MAX_BODY_BYTES   MLCTRIO_LOG_LEVEL

Host and port are Hypercorn's (`--bind`). On SIGTERM Hypercorn stops accepting, waits its graceful
timeout, then the app's lifespan shutdown aborts what is left and joins the engine thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from quart_trio import QuartTrio

from .cli import build_parser, config_from_args
from .config import ServerConfig
from .loader import core_factory
from .server.app import create_app
from .service import AsyncEngine

_VALUE_FLAGS = (
    "model_lib",
    "quantization",
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
_SWITCHES = ("allow_credentials", "enable_debug", "enable_tracing")


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
    return create_app(config, engine, own_engine=True)


app = create_app_from_env()
