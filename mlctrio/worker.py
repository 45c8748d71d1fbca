"""The engine worker thread's loop: commands in, each step's outputs posted out.

    service.AsyncEngine ── Submit / Abort / Stop ──> commands queue ──> run_worker(core, ...)
                        <── post(outputs, stats, events) ──────────── after each core.step()

Rules:
- Only this thread touches the core (`Core`, runtime.core.EngineCore or the echo model's).
- A request the core refuses (`add_request` raises) gets one final output with the error
  (`failed_output`); an exception from `step()` ends the loop and propagates to the caller,
  after the core is closed.
- Outputs are posted from a separate poster thread, released when the next model call begins
  (see `run_worker`), never while the worker holds work for trio.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from .engine.types import ChoiceDelta, GenerationRequest, RequestOutput, Usage


class CoreStats(Protocol):
    """What the server reads of the engine core's statistics (runtime.engine_stats.EngineStats)."""

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
class Submit:
    request: GenerationRequest


@attrs.frozen
class Abort:
    request_id: str
    reason: str  # an AbortReason (a str enum)


class Stop:
    pass


Commands = queue.SimpleQueue[Submit | Abort | Stop]


def run_worker(core: Core, commands: Commands, post: Callable[..., None]) -> None:
    """The engine loop. A step's outputs reach trio through a poster thread, released when
    the next step's model call begins (the runner's launch hook) or when the loop goes idle.

    Why: `run_sync_soon` writes trio's wakeup socket, and that syscall releases the GIL;
    the woken trio thread takes it and holds it for its whole burst of per-token work (SSE
    framing, sockets: ~50 us a token), re-taking it after each short release, so a worker
    posting directly waited for that burst at every step (up to the 5 ms switch interval).
    Released right before the model call, the burst runs while the worker is in TVM (or
    the echo model's sleep) and does not need the GIL.

    An exception escaping the core ends the loop and propagates (serve_engine fails the
    engine); the core is still closed, but its final outputs are not posted: the trio side
    ends those requests with an error instead of "abort".
    """
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
            post(*item)

    post_thread = threading.Thread(target=poster, name="mlctrio-post", daemon=True)
    post_thread.start()
    core.set_launch_hook(release)
    failed = True
    try:
        while _run_commands(core, commands, held, release):
            if core.has_work():
                before = releases[0]
                outputs = core.step()
                held.append((outputs, core.stats(), core.drain_events()))
                if releases[0] == before:  # the hook did not run: no model call this step
                    release()
        failed = False
    finally:
        try:
            core.set_launch_hook(None)
            release()
            final = core.close()
            if not failed:
                outbox.put((final, core.stats()))
        finally:  # the poster always ends, even if close() raised
            outbox.put(None)
            post_thread.join()


def _run_commands(
    core: Core,
    commands: Commands,
    held: list[tuple[Any, ...]],
    release: Callable[[], None],
) -> bool:
    """Apply queued commands (waiting for one when the core is idle); False on stop."""
    block = not core.has_work()
    if block:
        release()  # going idle: nothing will launch soon
    while True:
        try:
            command = commands.get(block=block)
        except queue.Empty:
            return True
        block = False
        if isinstance(command, Submit):
            request = command.request
            try:
                core.add_request(request)
            except Exception as exc:  # reported to that request
                n, num_prompt = request.params.n, len(request.prompt_token_ids)
                held.append(([failed_output(request.request_id, n, num_prompt, str(exc))], None))
                release()
        elif isinstance(command, Abort):
            core.abort_request(command.request_id, str(command.reason))
        else:
            return False


def failed_output(request_id: str, n: int, num_prompt_tokens: int, message: str) -> RequestOutput:
    deltas = tuple(ChoiceDelta(index=i, finish_reason="error") for i in range(n))
    return RequestOutput(
        request_id=request_id,
        deltas=deltas,
        usage=Usage(prompt_tokens=num_prompt_tokens, completion_tokens=0),
        finished=True,
        error=message,
    )
