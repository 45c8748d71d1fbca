"""Waiting on an engine stream from a route: deadlines, keep-alive pings, batching, errors.

`next_batch` is what a streaming body awaits between writes: every output already delivered
(so a stream that fell behind catches up in one write), plus the control bytes that must follow
them (a keep-alive comment, or an error event and `[DONE]` that end the stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio
from quart import Response

from ..engine.types import GenerationRequest, RequestOutput
from ..errors import EngineFailedError, RequestTimeoutError
from ..service import RequestStream
from .app import ServerState
from .sse import DONE, PING, event

_TIMEOUT = object()


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


async def next_batch(stream: RequestStream, state: ServerState, deadline: float) -> Batch:
    output = await _next_output(stream, deadline, state.sse_ping_interval_s)
    if output is None:
        return Batch(done=True)
    if output is PING:
        return Batch(control=PING)
    if output is _TIMEOUT:
        stream.abort_reason = "timeout"
        return Batch(control=event(timeout_error(state).to_dict()) + DONE, end=True)
    ready = [output, *stream.receive_ready()]
    for k, item in enumerate(ready):
        if item.error is not None:
            error = event(engine_error(item.error).to_dict()) + DONE
            return Batch(ready[:k], error, end=True)
    return Batch(ready)


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
        stream.abort_reason = "timeout"
        raise timeout_error(state)


async def in_thread(fn: Any, *args: Any) -> Any:
    """Tokenization and template rendering run off the event loop."""
    return await trio.to_thread.run_sync(fn, *args)
