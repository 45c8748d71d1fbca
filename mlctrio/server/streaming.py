"""Waiting on an engine stream from a route: deadlines, keep-alive pings, batching, errors, and
the one SSE loop both streaming APIs share.

Rules:
- `stream_events` is the only streaming loop; chat, completions and responses pass their per-API
  part (a `StreamWriter`). A stream that got its 200 always ends with the writer's `closing()`
  (its last events and `[DONE]`), or with `writer.failure(error)` if it failed (engine error,
  deadline, an exception in our own per-token work, the server cutting it at shutdown): the error
  event and `[DONE]` for chat and completions (`EndsWithDone`), response.failed for
  /v1/responses.
- `next_batch` is what a streaming body awaits between writes: every output already delivered
  (so a stream that fell behind catches up in one write), plus the control bytes that must follow
  them (a keep-alive comment, or an error event and `[DONE]` that end the stream).
- The engine stream is closed with the `AbortReason` of how the loop ended (GeneratorExit or
  Cancelled: the client left).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio
from quart import Response, request

from ..engine.types import GenerationRequest, RequestOutput
from ..errors import EngineFailedError, RequestError, RequestTimeoutError, ServiceUnavailableError
from ..service import AbortReason, RequestStream, abort_reason_for
from .asgi import on_request_end, on_stream_cut
from .sse import DONE, PING, event
from .state import ServerState

log = logging.getLogger("mlctrio.server")

_TIMEOUT = object()

INTERNAL_ERROR = EngineFailedError("Internal server error.", code="internal_error")
STREAM_CUT = ServiceUnavailableError(
    "The server stopped this stream before it finished (shutting down); retry the request."
)

#: How a failed stream ends, given the error (what follows the events already written).
Failure = Callable[[RequestError], bytes]


def error_and_done(error: RequestError) -> bytes:
    """The default ending of a failed stream: the OpenAI error envelope, then [DONE]."""
    return event(error.to_dict()) + DONE


class StreamWriter(Protocol):
    """The per-API part of a streamed response: the events around and for each output, and how
    the stream ends."""

    def opening(self) -> list[bytes]:
        """Events before any output (chat's role chunks, completions' echo)."""
        ...

    def output_events(self, output: RequestOutput) -> list[bytes]: ...

    def closing(self) -> list[bytes]:
        """Events after the last output, the terminator included (the usage chunk, [DONE])."""
        ...

    def failure(self, error: RequestError) -> bytes:
        """How a failed stream ends, after the events already written."""
        ...


class EndsWithDone:
    """The OpenAI chat/completions ending of a failed stream: the error envelope, then [DONE]."""

    def failure(self, error: RequestError) -> bytes:
        return error_and_done(error)


@attrs.frozen
class Batch:
    outputs: Sequence[RequestOutput] = ()
    control: bytes = b""  # written after the outputs' events
    end: bool = False  # the stream must end after this batch
    done: bool = False  # every request delivered its final output


def deadline_for(state: ServerState) -> float:
    timeout = state.config.request_timeout_s
    return trio.current_time() + timeout if timeout else float("inf")


def timeout_error(state: ServerState) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"The request took longer than the server's timeout of "
        f"{state.config.request_timeout_s} s and was aborted."
    )


def engine_error(message: str) -> EngineFailedError:
    return EngineFailedError(f"The engine failed while generating: {message}")


async def _next_output(stream: RequestStream, deadline: float, ping_s: float) -> Any:
    """The next output, PING when nothing came for ping_s, _TIMEOUT past the deadline."""
    wake = min(deadline, trio.current_time() + ping_s)
    with trio.move_on_at(wake):
        return await stream.receive()
    return _TIMEOUT if trio.current_time() >= deadline else PING


async def next_batch(
    stream: RequestStream, state: ServerState, deadline: float, failure: Failure
) -> Batch:
    output = await _next_output(stream, deadline, state.sse_ping_interval_s)
    if output is None:
        return Batch(done=True)
    if output is PING:
        return Batch(control=PING)
    if output is _TIMEOUT:
        stream.abort_reason = AbortReason.TIMEOUT
        return Batch(control=failure(timeout_error(state)), end=True)
    ready = [output, *stream.receive_ready()]
    for k, item in enumerate(ready):
        if item.error is not None:
            return Batch(ready[:k], failure(engine_error(item.error)), end=True)
    return Batch(ready)


async def stream_events(
    state: ServerState, stream: RequestStream, writer: StreamWriter, deadline: float
) -> AsyncIterator[bytes]:
    """The SSE body of a submitted stream; closes `stream` however it ends."""
    reason = AbortReason.ABORT
    try:
        if opening := b"".join(writer.opening()):
            yield opening
        while not (batch := await next_batch(stream, state, deadline, writer.failure)).done:
            events = [e for output in batch.outputs for e in writer.output_events(output)]
            events.append(batch.control)
            if data := b"".join(events):  # one write for everything that was ready
                yield data
            if batch.end:
                return
        yield b"".join(writer.closing())
    except Exception:  # a bug in our per-token work: fail this stream, keep the server serving
        log.exception("streaming response failed")
        reason = AbortReason.ERROR
        yield writer.failure(INTERNAL_ERROR)
    except BaseException as exc:
        reason = abort_reason_for(exc)
        raise
    finally:
        stream.close(reason)


def streamed_response(
    state: ServerState, stream: RequestStream, writer: StreamWriter, deadline: float
) -> Response:
    """The SSE response of a submitted stream. The engine stream is closed when the request
    ends, even if the body is never iterated; a body cut off after its 200 (the server's own
    shutdown) still ends with the writer's `failure` (server/asgi.py)."""
    on_request_end(request.scope, stream.close)
    on_stream_cut(request.scope, lambda: writer.failure(STREAM_CUT))
    return sse_response(stream_events(state, stream, writer, deadline))


def sse_response(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, content_type="text/event-stream; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None  # our own deadline applies, never Quart's 60 s cut
    return response


async def collect(
    state: ServerState, requests: Sequence[GenerationRequest], deadline: float
) -> list[RequestOutput]:
    """Run requests to completion (non-streaming)."""
    outputs: list[RequestOutput] = []
    async with state.engine.generate(requests) as stream:
        with trio.move_on_at(deadline):
            while (output := await stream.receive()) is not None:
                if output.error is not None:
                    raise engine_error(output.error)
                outputs.append(output)
            return outputs
        stream.abort_reason = AbortReason.TIMEOUT
        raise timeout_error(state)


async def in_thread(fn: Any, *args: Any) -> Any:
    """Tokenization and template rendering run off the event loop."""
    return await trio.to_thread.run_sync(fn, *args)
