"""The one bridge between trio and the engine worker thread.

    trio side                                   worker thread
    ---------                                   -------------
    AsyncEngine.submit()    ── submit ──> queue ──> EngineCore.add_request()
    RequestStream.close()   ── abort  ──> queue ──> EngineCore.abort_request()
    per-request channel    <── run_sync_soon(deliver, outputs, stats) ── EngineCore.step()

Rules:
- Admission and submission are one synchronous step (`submit()`): a route that got a stream
  back may send its 200, nothing can refuse the request afterwards.
- Anything that may run under cancellation is synchronous: `RequestStream.close()` and `abort()`
  put a message on a thread-safe queue and return; they never await.
- Every abort carries an `AbortReason`, the same value from the route to the metric label; the
  first reason given for a request wins.
- The worker thread's loop is worker.py's `run_worker`. It posts once per step with
  `TrioToken.run_sync_soon`; `_deliver` never raises and drops outputs whose request is gone.
  Per-request channels are unbounded so the worker never blocks on a slow client (a request
  holds at most max_tokens outputs).
- The worker thread runs under its own CapacityLimiter(1) and is always joined: `serve()` returns
  only after the thread has closed the core.
- If the worker dies (an exception escapes the core), the engine turns FAILED: the error is logged
  once, every pending request gets a final output with an error, new requests get 503, and
  `serve_engine` waits for `stop_engine()` so the server can still say so on /health.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import queue
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from .engine.model_info import ModelInfo as ModelInfo  # re-exported: server/app.py names it here
from .engine.types import GenerationRequest, RequestOutput
from .errors import EngineError, QueueFullError, ServiceUnavailableError
from .worker import Abort, Commands, Core, Stop, Submit, failed_output, run_worker

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the worker died: nothing more is served


class AbortReason(enum.StrEnum):
    """Why a request was aborted: the `reason` label of mlctrio_requests_aborted_total."""

    CLIENT_DISCONNECT = "client_disconnect"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    ERROR = "error"  # an exception in the server while the request was in flight
    ABORT = "abort"  # left unfinished with no more specific reason


def abort_reason_for(exc: BaseException) -> AbortReason:
    """The reason to abort with when `exc` ends a request's block: Cancelled (the connection's
    task was cancelled) and GeneratorExit (a streaming body closed unfinished) mean the client
    went away; anything else is an error."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = exc.exceptions
        if leaves and all(abort_reason_for(e) is AbortReason.CLIENT_DISCONNECT for e in leaves):
            return AbortReason.CLIENT_DISCONNECT
        return AbortReason.ERROR
    if isinstance(exc, trio.Cancelled | GeneratorExit):
        return AbortReason.CLIENT_DISCONNECT
    return AbortReason.ERROR


@attrs.define
class _Pending:
    send: trio.MemorySendChannel[RequestOutput]
    num_choices: int
    num_prompt_tokens: int
    started: bool = False
    abort_reason: AbortReason | None = None


class Observer(Protocol):
    """Sees every request and output (metrics, tracing). Its methods must not raise."""

    def on_submit(self, request: GenerationRequest) -> None: ...

    def on_output(self, output: RequestOutput, abort_reason: AbortReason | None) -> None: ...

    def on_stats(self, stats: Any) -> None: ...

    def on_events(self, events: Sequence[tuple[str, str, float]]) -> None: ...


@attrs.define(eq=False)
class RequestStream:
    """Outputs of the requests of one `submit()`, in engine order.

    Whoever holds it must `close()` it (idempotent): that aborts what is unfinished.
    """

    _engine: AsyncEngine
    _receive: trio.MemoryReceiveChannel[RequestOutput]
    unfinished: set[str]
    #: Set by the consumer when it knows better than `close()`'s caller (e.g. a deadline).
    abort_reason: AbortReason | None = None

    async def receive(self) -> RequestOutput | None:
        """The next output, or None once every request has delivered its final one.

        Cancel-safe: a cancelled receive loses nothing.
        """
        if not self.unfinished:
            return None
        output = await self._receive.receive()
        if output.finished:
            self.unfinished.discard(output.request_id)
        return output

    def receive_ready(self) -> list[RequestOutput]:
        """Every output already delivered, without waiting (lets a slow writer catch up in
        one write instead of one per engine step)."""
        ready: list[RequestOutput] = []
        while self.unfinished:
            try:
                output = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            if output.finished:
                self.unfinished.discard(output.request_id)
            ready.append(output)
        return ready

    def close(self, reason: AbortReason = AbortReason.CLIENT_DISCONNECT) -> None:
        """Abort every unfinished request (with `abort_reason` if set, else `reason`) and stop
        receiving. Synchronous: safe under cancellation and in `finally`."""
        for request_id in self.unfinished:
            self._engine.abort(request_id, self.abort_reason or reason)
        self.unfinished = set()
        self._receive.close()


@attrs.define(eq=False)
class AsyncEngine:
    """Owns the worker thread and routes outputs to per-request channels.

    Create with `open_engine()`; use `submit()` (or `generate()`) from request handlers.
    """

    max_queued_requests: int
    _core_factory: Callable[[], tuple[Core, ModelInfo]]
    info: ModelInfo | None = None
    _observer: Observer | None = None
    state: EngineState = EngineState.LOADING
    _commands: Commands = attrs.field(factory=queue.SimpleQueue)
    _pending: dict[str, _Pending] = attrs.field(factory=dict)
    _stats: Any = None
    _trio_token: trio.lowlevel.TrioToken | None = None
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _stop_requested: trio.Event = attrs.field(factory=trio.Event)

    # ---- trio side -------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    @property
    def num_queued(self) -> int:
        return sum(1 for p in self._pending.values() if not p.started)

    def stats(self) -> Any:
        return self._stats

    def abort(self, request_id: str, reason: AbortReason | str = AbortReason.ABORT) -> None:
        """Ask the engine to abort a request. Synchronous, safe under cancellation."""
        pending = self._pending.get(request_id)
        if pending is not None and pending.abort_reason is None:
            pending.abort_reason = AbortReason(reason)
            self._commands.put(Abort(request_id, pending.abort_reason))

    def abort_all(self, reason: AbortReason | str) -> None:
        for request_id in list(self._pending):
            self.abort(request_id, reason)

    def check_admission(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise what submitting these requests now would get: a 503 (not ready, draining,
        failed, queue full) or the engine's 400 (n or prompt beyond its limits)."""
        if self.state is EngineState.FAILED:
            raise ServiceUnavailableError(
                "The engine failed and serves no more requests; the server must be restarted.",
                code="engine_failed",
            )
        if self.state is not EngineState.READY:
            raise ServiceUnavailableError(
                f"The server is {self.state.value}; try again later.",
                headers={"Retry-After": "1"},
            )
        if self.num_queued + len(requests) > self.max_queued_requests:
            raise QueueFullError(
                f"Too many queued requests (limit {self.max_queued_requests}); try again later.",
                headers={"Retry-After": "1"},
            )
        limits = self.info.limits if self.info is not None else None
        if limits is not None:
            for request in requests:
                limits.check(request)

    def submit(self, requests: Sequence[GenerationRequest]) -> RequestStream:
        """Admit and submit requests (one HTTP request may hold several) in one synchronous
        step; return the stream of their outputs, which the caller must `close()`."""
        self.check_admission(requests)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self._pending for i in ids):
            raise EngineError(f"duplicate request id among {ids}")
        send, receive = trio.open_memory_channel[RequestOutput](math.inf)
        if self._idle.is_set():
            self._idle = trio.Event()
        for request in requests:
            self._pending[request.request_id] = _Pending(
                send.clone(), request.params.n, len(request.prompt_token_ids)
            )
            if self._observer is not None:
                self._observer.on_submit(request)
            self._commands.put(Submit(request))
        send.close()
        return RequestStream(self, receive, set(ids))

    @contextlib.asynccontextmanager
    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[RequestStream]:
        """`submit()` as a block: leaving it before every final output arrived aborts the
        unfinished requests (the reason from how the block was left: `abort_reason_for`)."""
        stream = self.submit(requests)
        reason = AbortReason.ABORT
        try:
            yield stream
        except BaseException as exc:
            reason = abort_reason_for(exc)
            raise
        finally:
            stream.close(reason)

    def _deliver(
        self,
        outputs: Sequence[RequestOutput],
        stats: Any,
        events: Sequence[tuple[str, str, float]] = (),
    ) -> None:
        """Runs in trio (via run_sync_soon). Must never raise."""
        try:
            observer = self._observer
            if events and observer is not None:
                observer.on_events(events)
            if stats is not None:
                self._stats = stats
                if observer is not None:
                    observer.on_stats(stats)
            for output in outputs:
                pending = self._pending.get(output.request_id)
                if observer is not None:
                    observer.on_output(output, pending.abort_reason if pending else None)
                if pending is None:
                    continue
                pending.started = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    pending.send.send_nowait(output)
                if output.finished:
                    pending.send.close()
                    del self._pending[output.request_id]
            if not self._pending:
                self._idle.set()
        except Exception:  # an exception here would crash trio.run: log it and go on
            log.exception("dropping engine outputs after an internal error")

    def _fail(self, exc: BaseException) -> None:
        """The worker died: FAILED, logged once, every pending request ends with an error."""
        self.state = EngineState.FAILED
        log.error(
            "engine failed: %s: %s (failing %d request(s); new requests get 503)",
            type(exc).__name__,
            exc,
            len(self._pending),
        )
        log.debug("engine failure", exc_info=exc)
        message = "the engine stopped after an internal error"
        self._deliver(
            [
                failed_output(request_id, p.num_choices, p.num_prompt_tokens, message)
                for request_id, p in self._pending.items()
            ],
            None,
        )

    async def wait_idle(self) -> None:
        """Wait until no request is in flight."""
        if self._pending:
            await self._idle.wait()

    # ---- worker thread ---------------------------------------------------------------------

    def _post(
        self,
        outputs: list[RequestOutput],
        stats: Any,
        events: Sequence[tuple[str, str, float]] = (),
    ) -> None:
        assert self._trio_token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(self._deliver, outputs, stats, events)

    def _run_worker(self, core: Core) -> None:
        """The engine loop (worker.run_worker), posting each step's outputs to trio."""
        run_worker(core, self._commands, self._post)


async def serve_engine(
    engine: AsyncEngine,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Load the core in the worker thread, then run the worker loop until `stop_engine()`.

    Started with `nursery.start(serve_engine, engine)`: returns from start() once the model is
    loaded and the engine accepts requests. Always joins the thread before returning. If the
    worker dies, the engine turns FAILED and this waits for `stop_engine()` (the server lives on
    to answer /health with 503 and new requests with 503).
    """
    engine._trio_token = trio.lowlevel.current_trio_token()
    limiter = trio.CapacityLimiter(1)
    core, engine.info = await trio.to_thread.run_sync(engine._core_factory, limiter=limiter)
    engine._stats = core.stats()
    engine.state = EngineState.READY
    task_status.started()

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop_engine(engine)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_cancel)
            # Not abandoned on cancel: cancellation reaches stop_on_cancel, which tells the worker
            # to stop, and we wait here until the thread has really closed the core.
            try:
                await trio.to_thread.run_sync(engine._run_worker, core, limiter=limiter)
            except Exception as exc:
                engine._fail(exc)
                await engine._stop_requested.wait()
            nursery.cancel_scope.cancel()
    finally:
        engine.state = EngineState.STOPPED


def stop_engine(engine: AsyncEngine) -> None:
    """Make the worker close the core (aborting what is left) and exit. Synchronous."""
    engine._stop_requested.set()
    engine._commands.put(Stop())


def shut_down(engine: AsyncEngine) -> None:
    """At server shutdown: refuse new requests, abort the open ones (reason "shutdown"), stop."""
    engine.state = EngineState.DRAINING
    engine.abort_all(AbortReason.SHUTDOWN)
    stop_engine(engine)
