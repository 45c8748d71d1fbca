"""Run the server: one nursery owns the Hypercorn trio server and the engines (one per model).

On SIGINT/SIGTERM: /health turns 503 and new requests get 503, in-flight requests finish up to
--shutdown-timeout, the rest are aborted, Hypercorn stops, every engine thread is joined, exit 0.

Logs a person reads: "listening on URL (loading MODEL)" once the socket is bound, then exactly
one "ready: serving NAME[, NAME...] at URL" once every model is loaded (one after another:
model_loads.py) and /health answers 200. With --access-log (MLCTRIO_ACCESS_LOG=1 under
Hypercorn) `AccessLog` adds one line per request on the "mlctrio.access" logger: client,
method, path, status, duration (for a stream: to its end).

Operator rules:
- A failure an operator can fix (the address cannot be bound, the model cannot be loaded) comes
  out of `run()` as one MlctrioError whose message is one line: cli.py prints it, exit 2.
- A model loads in `ModelLoad` (model_loads.py), on a thread trio abandons when the load is
  cancelled: a signal while a model loads or compiles (minutes, the first time) stops at once
  instead of waiting for it; `run()` then leaves with `exit_now` (no interpreter teardown
  under a live compile).
- The first SIGINT/SIGTERM drains; a second one exits at once (`exit_now`, status 130).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, NoReturn, TypeVar

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from . import hypercorn_patches  # noqa: F401  (applied on import)
from .config import ServerConfig
from .errors import ConfigError, MlctrioError, ModelLoadError
from .loader import core_factory
from .model_loads import ModelSet
from .server.app import ServerState, create_app, drain
from .service import serve_engine, stop_engine

log = logging.getLogger("mlctrio")
ACCESS_LOGGER = "mlctrio.access"
KEEP_ALIVE_TIMEOUT_S = 75.0
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]
E = TypeVar("E", bound=BaseException)


@attrs.frozen
class AccessLog:
    """ASGI middleware: one INFO line per HTTP request once its response has ended, e.g.
    `127.0.0.1:50312 "POST /v1/chat/completions" 200 412.7 ms` ("-" for a status never sent)."""

    app: ASGIApp
    logger: logging.Logger = attrs.field(factory=lambda: logging.getLogger(ACCESS_LOGGER))

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []
        started = time.perf_counter()

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            self.logger.info(
                '%s "%s %s" %s %.1f ms',
                f"{client[0]}:{client[1]}" if client else "-",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status[0] if status else "-",
                (time.perf_counter() - started) * 1000,
            )


def add_access_log(app: QuartTrio) -> None:
    """Wrap the app's ASGI callable in `AccessLog` (Quart's way to add middleware)."""
    app.asgi_app = AccessLog(app.asgi_app)  # type: ignore[method-assign,assignment]


def exit_now(code: int, message: str | None = None) -> NoReturn:
    """Leave the process at once: `message` as one stderr line, log handlers flushed, and
    nothing else (no thread joined, no atexit hook: a compile may still run on a thread)."""
    if message:
        print(f"mlctrio: {message}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def watch_signals(stop_requested: trio.Event) -> None:
    """The first SIGINT/SIGTERM asks for a graceful stop; a second one exits at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        first = True
        async for signum in signals:
            if not first:
                exit_now(INTERRUPTED_EXIT, "interrupted")
            first = False
            log.info("received %s: draining (again to stop at once)", signal.Signals(signum).name)
            stop_requested.set()


async def serve_engines_announced(
    models: ModelSet,
    where: str | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_engine` for every model, logging the one "ready" line (naming them all) as soon
    as every engine accepts requests. Returns once every engine thread is joined."""
    async with trio.open_nursery() as nursery:
        for engine in models.engines:
            await nursery.start(serve_engine, engine)
        log.info("ready: serving %s%s", ", ".join(models.names), f" at {where}" if where else "")
        task_status.started()


def stop_engines(models: ModelSet) -> None:
    for engine in models.engines:
        stop_engine(engine)


def hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.graceful_timeout = 5.0
    # Longer than the idle timeouts of load balancers (60 s) and clients' pools (httpx: 5 s), so
    # the server is never the side that closes a connection a client is about to reuse; a
    # connection the client closes is closed at once (hypercorn_patches.py).
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


@attrs.frozen
class RunningServer:
    """What `serve` reports once it listens (used by tests and embedding code)."""

    binds: list[str]
    state: ServerState
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return self.binds[0]


async def serve(
    config: ServerConfig,
    *,
    handle_signals: bool = True,
    sse_ping_interval_s: float = 10.0,
    models: ModelSet | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or until `RunningServer.shutdown` is set), then drain."""
    if models is None:
        models = ModelSet.build(config, factory_for=core_factory)
    app = create_app(
        config,
        models.engines[0],
        additional_engines=models.engines[1:],
        own_engine=False,
        sse_ping_interval_s=sse_ping_interval_s,
    )
    state: ServerState = app.extensions["mlctrio"]
    if config.access_log:
        add_access_log(app)
    shutdown = trio.Event()
    stop_requested = trio.Event()
    http_done = trio.Event()

    async def on_stop() -> None:
        await stop_requested.wait()
        await drain(state, config.shutdown_timeout_s)
        shutdown.set()

    async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn_serve(
                app,
                hypercorn_config(config),
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        finally:
            stop_engines(models)  # HTTP is done: let the engines close and their threads end
            http_done.set()

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(watch_signals, stop_requested)
        nursery.start_soon(on_stop)
        binds = await _listen(nursery, run_http, config)
        loading = ", ".join(c.model for c in models.configs)
        log.info("listening on %s (loading %s)", ", ".join(binds), loading)
        task_status.started(RunningServer(binds, state, stop_requested))
        # A load error propagates and cancels HTTP; a stop while loading abandons the load.
        if await models.load_all(stop_requested):
            # Returns once the engine threads are joined (after HTTP is done).
            await serve_engines_announced(models, binds[0])
        else:
            log.info("stopped before %s was loaded", loading)
            await http_done.wait()
        nursery.cancel_scope.cancel()


async def _listen(
    nursery: trio.Nursery,
    run_http: Callable[..., Awaitable[None]],
    config: ServerConfig,
) -> list[str]:
    """Start HTTP; an address that cannot be bound is a one-line ConfigError."""
    try:
        binds: list[str] = await nursery.start(run_http)
    except (OSError, BaseExceptionGroup) as exc:
        error = _first_leaf(exc, OSError)
        if error is None:
            raise
        reason = (error.strerror or str(error)).lower()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {reason}") from exc
    return binds


def run(config: ServerConfig) -> int:
    """Serve until a signal; our own errors (bad model, address in use) come out unwrapped."""
    models = ModelSet.build(config, factory_for=core_factory)
    try:
        trio.run(partial(serve, config, models=models))
    except BaseExceptionGroup as group:
        ours, rest = group.split(MlctrioError)
        if ours is None or rest is not None:
            raise
        leaf = _first_leaf(ours, MlctrioError)
        assert leaf is not None
        failed = models.failed_model()
        if failed is not None:
            raise ModelLoadError(f"cannot load {failed}: {leaf}") from leaf
        # Its own cause (a wrapped foreign error) is the detail; the groups are noise.
        raise leaf from leaf.__cause__
    if models.abandoned:  # a load still runs on its thread: do not wait for it
        exit_now(0)
    return 0


def _first_leaf(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in `exc` or its (nested) groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_leaf(inner, kind)
            if found is not None:
                return found
    return None
