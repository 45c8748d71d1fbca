"""Run the server: one nursery owns the Hypercorn trio server and the engine.

On SIGINT/SIGTERM: /health turns 503 and new requests get 503, in-flight requests finish up to
--shutdown-timeout, the rest are aborted, Hypercorn stops, the engine thread is joined, exit 0.

Logs a person reads: "listening on URL (loading MODEL)" once the socket is bound, then exactly
one "ready: serving MODEL at URL" once the model is loaded and /health answers 200. With
--access-log (MLCTRIO_ACCESS_LOG=1 under Hypercorn) `AccessLog` adds one line per request on
the "mlctrio.access" logger: client, method, path, status, duration (for a stream: to its end).

Operator rules:
- A failure an operator can fix (the address cannot be bound, the model cannot be loaded) comes
  out of `run()` as one MlctrioError whose message is one line: cli.py prints it, exit 2.
- The model loads in `ModelLoad`, on a thread trio abandons when the load is cancelled: a signal
  while the model loads or compiles (minutes, the first time) stops at once instead of waiting
  for it; `run()` then leaves with `exit_now` (no interpreter teardown under a live compile).
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
from .loader import CoreFactory, core_factory
from .server.app import ServerState, create_app, drain
from .service import AsyncEngine, serve_engine, stop_engine

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


def one_line(exc: BaseException) -> str:
    """An exception as one line for an operator: our own messages as they are, a foreign one
    with its type (for a TVM error, its last line: its first is "Traceback ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1] if "Traceback" in lines[0] else lines[0]
    return text if isinstance(exc, MlctrioError) else f"{type(exc).__name__}: {text}"


@attrs.define(eq=False)
class ModelLoad:
    """The model's load, run by `load()` on a thread trio abandons if the load is cancelled (a
    thread cannot be stopped, and a first compile takes minutes). Handed to `AsyncEngine` as
    its core factory: called on the engine thread after `load()`, it returns what was loaded."""

    model: str
    factory: CoreFactory
    loaded: tuple[Any, Any] | None = None
    abandoned: bool = False  # cancelled while loading: the thread may still run
    failed: bool = False

    async def load(self) -> None:
        """Load; an error that is not ours becomes a one-line ModelLoadError."""
        try:
            self.loaded = await trio.to_thread.run_sync(self.factory, abandon_on_cancel=True)
        except trio.Cancelled:
            self.abandoned = True
            raise
        except MlctrioError:
            self.failed = True
            raise
        except Exception as exc:
            self.failed = True
            raise ModelLoadError(one_line(exc)) from exc

    def __call__(self) -> Any:
        if self.loaded is None:  # not loaded beforehand: load here, on the engine thread
            return self.factory()
        loaded, self.loaded = self.loaded, None
        return loaded


async def load_unless_stopped(model_load: ModelLoad, stop: trio.Event) -> bool:
    """Load the model unless `stop` is set first (the load is then abandoned). Loaded?"""
    async with trio.open_nursery() as nursery:

        async def cancel_on_stop() -> None:
            await stop.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_on_stop)
        await model_load.load()
        nursery.cancel_scope.cancel()
    return model_load.loaded is not None


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
    model_load: ModelLoad | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or until `RunningServer.shutdown` is set), then drain."""
    if model_load is None:
        model_load = ModelLoad(config.model, core_factory(config))
    engine = AsyncEngine(config.max_queued_requests, model_load)
    app = create_app(config, engine, own_engine=False, sse_ping_interval_s=sse_ping_interval_s)
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
            stop_engine(engine)  # HTTP is done: let the engine close and its thread end
            http_done.set()

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(watch_signals, stop_requested)
        nursery.start_soon(on_stop)
        binds = await _listen(nursery, run_http, config)
        log.info("listening on %s (loading %s)", ", ".join(binds), config.model)
        task_status.started(RunningServer(binds, state, stop_requested))
        # A load error propagates and cancels HTTP; a stop while loading abandons the load.
        if await load_unless_stopped(model_load, stop_requested):
            # Returns once the engine thread is joined (after HTTP is done).
            await serve_engine_announced(engine, config, binds[0])
        else:
            log.info("stopped before %s was loaded", config.model)
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
    model_load = ModelLoad(config.model, core_factory(config))
    try:
        trio.run(partial(serve, config, model_load=model_load))
    except BaseExceptionGroup as group:
        ours, rest = group.split(MlctrioError)
        if ours is None or rest is not None:
            raise
        leaf = _first_leaf(ours, MlctrioError)
        assert leaf is not None
        if model_load.failed:
            raise ModelLoadError(f"cannot load {config.model}: {leaf}") from leaf
        # Its own cause (a wrapped foreign error) is the detail; the groups are noise.
        raise leaf from leaf.__cause__
    if model_load.abandoned:  # the load still runs on its thread: do not wait for it
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
