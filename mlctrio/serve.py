"""Run the server: one nursery owns the Hypercorn trio server and the engine.

On SIGINT/SIGTERM: /health turns 503 and new requests get 503, in-flight requests finish up to
--shutdown-timeout, the rest are aborted, Hypercorn stops, the engine thread is joined, exit 0.

Logs a person reads: "listening on URL (loading MODEL)" once the socket is bound, then exactly
one "ready: serving MODEL at URL" once the model is loaded and /health answers 200. With
--access-log (MLCTRIO_ACCESS_LOG=1 under Hypercorn) `AccessLog` adds one line per request on
the "mlctrio.access" logger: client, method, path, status, duration (for a stream: to its end).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from .config import ServerConfig
from .errors import MlctrioError
from .loader import core_factory
from .server.app import ServerState, create_app, drain
from .service import AsyncEngine, serve_engine, stop_engine

log = logging.getLogger("mlctrio")
ACCESS_LOGGER = "mlctrio.access"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


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


async def serve_engine_announced(
    engine: AsyncEngine,
    config: ServerConfig,
    where: str | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_engine`, logging the one "ready" line as soon as the engine accepts requests."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_engine, engine)
        log.info("ready: serving %s%s", config.model_name, f" at {where}" if where else "")
        task_status.started()


def hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.graceful_timeout = 5.0
    hc.keep_alive_timeout = 75.0
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
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or until `RunningServer.shutdown` is set), then drain."""
    engine = AsyncEngine(config.max_queued_requests, core_factory(config))
    app = create_app(config, engine, own_engine=False, sse_ping_interval_s=sse_ping_interval_s)
    state: ServerState = app.extensions["mlctrio"]
    if config.access_log:
        add_access_log(app)
    shutdown = trio.Event()

    stop_requested = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                stop_requested.set()
                break

    async def on_stop() -> None:
        await stop_requested.wait()
        await drain(state, config.shutdown_timeout_s)
        shutdown.set()

    async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn_serve(
                app,  # type: ignore[arg-type]
                hypercorn_config(config),
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        finally:
            stop_engine(engine)  # HTTP is done: let the engine close and its thread end

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(on_signals)
        nursery.start_soon(on_stop)
        binds = await nursery.start(run_http)
        log.info("listening on %s (loading %s)", ", ".join(binds), config.model)
        task_status.started(RunningServer(binds, state, stop_requested))
        # Returns once the engine thread is joined; a load error propagates and cancels HTTP.
        await serve_engine_announced(engine, config, binds[0])
        nursery.cancel_scope.cancel()


def run(config: ServerConfig) -> int:
    """Serve until a signal; our own errors (bad model, bad config) come out unwrapped."""
    try:
        trio.run(serve, config)
    except BaseExceptionGroup as group:
        ours, rest = group.split(MlctrioError)
        if ours is not None and rest is None:
            raise _first_leaf(ours) from None
        raise
    return 0


def _first_leaf(group: BaseExceptionGroup[MlctrioError]) -> MlctrioError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
