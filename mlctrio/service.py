"""The one bridge between trio and the engine worker thread.

    trio side                                   worker thread
    ---------                                   -------------
    AsyncEngine.generate() ── submit ──> queue ──> EngineCore.add_request()
    (cancelled / finished)  ── abort  ──> queue ──> EngineCore.abort_request()
    per-request channel    <── run_sync_soon(deliver, outputs, stats) ── EngineCore.step()

Rules:
- Anything that may run under cancellation is synchronous: `abort()` puts a message on a
  thread-safe queue and returns; it never awaits.
- The worker posts once per step with `TrioToken.run_sync_soon`; `_deliver` never raises and drops
  outputs whose request is gone. Per-request channels are unbounded so the worker never blocks on
  a slow client (a request holds at most max_tokens outputs).
- The worker thread runs under its own CapacityLimiter(1) and is always joined: `serve()` returns
  only after the thread has closed the core.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import trio

from .engine.request import EngineLimits
from .engine.tokens import ChatTemplate, Tokenizer
from .engine.types import GenerationRequest, OutputConstraint, RequestOutput
from .errors import EngineError, QueueFullError, ServiceUnavailableError

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class CoreStats(Protocol):
    """What the server reads of the engine core's statistics (runtime.core.EngineStats)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage_ratio(self) -> float: ...

    @property
    def num_preemptions_total(self) -> int: ...


class Core(Protocol):
    """The synchronous engine core the worker thread drives (runtime.core.EngineCore)."""

    def add_request(self, request: GenerationRequest) -> None: ...

    def abort_request(self, request_id: str, reason: str = "abort") -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> Any: ...

    def close(self) -> list[RequestOutput]: ...

    def drain_events(self) -> list[tuple[str, str, float]]: ...

    def set_launch_hook(self, hook: Callable[[], None] | None) -> None: ...


@attrs.frozen
class ModelInfo:
    """What the server needs to know about the served model."""

    model_id: str
    context_window_size: int
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    created: int = attrs.field(factory=lambda: int(time.time()))
    config: Mapping[str, Any] = attrs.field(factory=dict)
    #: Compiles an OutputConstraint (raising a 400-style error if it cannot); None: the model
    #: has no grammar support (e.g. mock://echo) and constraints are refused.
    check_constraint: Callable[[OutputConstraint], None] | None = None
    tool_call_format: str = "hermes"
    #: parallel_tool_calls when a request leaves it unset: True (OpenAI's default) for templates
    #: that render tools themselves; False where mlctrio injects the tool prompt (the model was
    #: not trained to call tools, let alone several: small ones repeat one call until max_tokens;
    #: llama.cpp's default is False too).
    parallel_tool_calls: bool = True
    #: The engine's admission limits (n vs max_num_sequence, prompt vs window and KV cache),
    #: checked before a request is submitted so a refusal is a 400 before any stream starts.
    limits: EngineLimits | None = None


@attrs.frozen
class _Submit:
    request: GenerationRequest


@attrs.frozen
class _Abort:
    request_id: str
    reason: str


class _Stop:
    pass


@attrs.define
class _Pending:
    send: trio.MemorySendChannel[RequestOutput]
    started: bool = False
    abort_reason: str | None = None


class Observer(Protocol):
    """Sees every request and output (metrics, tracing). Its methods must not raise."""

    def on_submit(self, request: GenerationRequest) -> None: ...

    def on_output(self, output: RequestOutput, abort_reason: str | None) -> None: ...

    def on_stats(self, stats: Any) -> None: ...

    def on_events(self, events: Sequence[tuple[str, str, float]]) -> None: ...


@attrs.define(eq=False)
class RequestStream:
    """Outputs of the requests of one `generate()` block, in engine order."""

    _receive: trio.MemoryReceiveChannel[RequestOutput]
    unfinished: set[str]
    abort_reason: str | None = None

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


def _is_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cancelled(e) for e in exc.exceptions)
    return False


@attrs.define(eq=False)
class AsyncEngine:
    """Owns the worker thread and routes outputs to per-request channels.

    Create with `open_engine()`; use `generate()` from request handlers.
    """

    max_queued_requests: int
    _core_factory: Callable[[], tuple[Core, ModelInfo]]
    info: ModelInfo | None = None
    _observer: Observer | None = None
    state: EngineState = EngineState.LOADING
    _commands: queue.SimpleQueue[_Submit | _Abort | _Stop] = attrs.field(factory=queue.SimpleQueue)
    _pending: dict[str, _Pending] = attrs.field(factory=dict)
    _stats: Any = None
    _trio_token: trio.lowlevel.TrioToken | None = None
    _idle: trio.Event = attrs.field(factory=trio.Event)

    # ---- trio side -------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    @property
    def num_queued(self) -> int:
        return sum(1 for p in self._pending.values() if not p.started)

    def stats(self) -> Any:
        return self._stats

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Ask the engine to abort a request. Synchronous, safe under cancellation."""
        pending = self._pending.get(request_id)
        if pending is not None and pending.abort_reason is None:
            pending.abort_reason = reason
            self._commands.put(_Abort(request_id, reason))

    def abort_all(self, reason: str) -> None:
        for request_id in list(self._pending):
            self.abort(request_id, reason)

    def check_admission(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise what submitting these requests now would get: a 503 (not ready, draining,
        queue full) or the engine's 400 (n or prompt beyond its limits)."""
        num_requests = len(requests)
        if self.state is not EngineState.READY:
            raise ServiceUnavailableError(
                f"The server is {self.state.value}; try again later.",
                headers={"Retry-After": "1"},
            )
        if self.num_queued + num_requests > self.max_queued_requests:
            raise QueueFullError(
                f"Too many queued requests (limit {self.max_queued_requests}); try again later.",
                headers={"Retry-After": "1"},
            )
        limits = self.info.limits if self.info is not None else None
        if limits is not None:
            for request in requests:
                limits.check(request)

    @contextlib.asynccontextmanager
    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[RequestStream]:
        """Submit requests (one HTTP request may hold several); yield one stream of their outputs.

        Leaving the block before every final output arrived (client gone, deadline, exception)
        aborts the unfinished requests in the engine. The abort is synchronous, so it also works
        under cancellation; the engine frees their pages at its next step boundary.
        """
        self.check_admission(requests)
        send, receive = trio.open_memory_channel[RequestOutput](math.inf)
        stream = RequestStream(receive, {r.request_id for r in requests})
        for request in requests:
            if request.request_id in self._pending:
                raise EngineError(f"duplicate request id {request.request_id}")
        if self._idle.is_set():
            self._idle = trio.Event()
        for request in requests:
            self._pending[request.request_id] = _Pending(send.clone())
            if self._observer is not None:
                self._observer.on_submit(request)
            self._commands.put(_Submit(request))
        send.close()
        reason = "abort"
        try:
            yield stream
        except trio.Cancelled:
            reason = "client_disconnect"
            raise
        except BaseException as exc:
            reason = "client_disconnect" if _is_cancelled(exc) else "error"
            raise
        finally:
            for request_id in stream.unfinished:
                self.abort(request_id, stream.abort_reason or reason)
            receive.close()

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
        """The engine loop. A step's outputs reach trio through a poster thread, released when
        the next step's model call begins (the runner's launch hook) or when the loop goes idle.

        Why: `run_sync_soon` writes trio's wakeup socket, and that syscall releases the GIL;
        the woken trio thread takes it and holds it for its whole burst of per-token work (SSE
        framing, sockets: ~50 us a token), re-taking it after each short release, so a worker
        posting directly waited for that burst at every step (up to the 5 ms switch interval).
        Released right before the model call, the burst runs while the worker is in TVM (or
        the echo model's sleep) and does not need the GIL.
        """
        commands = self._commands
        stopping = False
        outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        held: list[tuple[Any, ...]] = []
        releases = [0]

        def release() -> None:
            releases[0] += 1
            for item in held:
                outbox.put(item)
            held.clear()

        def poster() -> None:
            while (item := outbox.get()) is not None:
                self._post(*item)

        post_thread = threading.Thread(target=poster, name="mlctrio-post", daemon=True)
        post_thread.start()
        core.set_launch_hook(release)
        try:
            while not stopping:
                block = not core.has_work()
                if block:
                    release()  # going idle: nothing will launch soon
                while True:
                    try:
                        command = commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if isinstance(command, _Submit):
                        try:
                            core.add_request(command.request)
                        except Exception as exc:  # reported to that request
                            held.append(([_failed(command.request, str(exc))], None))
                            release()
                    elif isinstance(command, _Abort):
                        core.abort_request(command.request_id, command.reason)
                    else:
                        stopping = True
                        break
                if stopping:
                    break
                if core.has_work():
                    before = releases[0]
                    outputs = core.step()
                    held.append((outputs, core.stats(), core.drain_events()))
                    if releases[0] == before:  # the hook did not run: no model call this step
                        release()
        finally:
            core.set_launch_hook(None)
            release()
            try:
                outbox.put((core.close(), core.stats()))
            finally:  # the poster always ends, even if close() raised
                outbox.put(None)
                post_thread.join()


def _failed(request: GenerationRequest, message: str) -> RequestOutput:
    from .engine.types import ChoiceDelta, Usage

    deltas = tuple(ChoiceDelta(index=i, finish_reason="error") for i in range(request.params.n))
    return RequestOutput(
        request_id=request.request_id,
        deltas=deltas,
        usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=0),
        finished=True,
        error=message,
    )


async def serve_engine(
    engine: AsyncEngine,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Load the core in the worker thread, then run the worker loop until `stop_engine()`.

    Started with `nursery.start(serve_engine, engine)`: returns from start() once the model is
    loaded and the engine accepts requests. Always joins the thread before returning.
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
            await trio.to_thread.run_sync(engine._run_worker, core, limiter=limiter)
            nursery.cancel_scope.cancel()
    finally:
        engine.state = EngineState.STOPPED


def stop_engine(engine: AsyncEngine) -> None:
    """Make the worker close the core (aborting what is left) and exit. Synchronous."""
    engine._commands.put(_Stop())
