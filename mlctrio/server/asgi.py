"""ASGI wrapper around the Quart app: what must hold for every HTTP request whatever the route.

Rules:
- A response never starts while the request body is still arriving. An early answer (401, 404,
  405, 413...) sent before the body was read left Hypercorn's HTTP/1.1 connection half way through
  the request: the next request on that keep-alive connection was never answered and a closed
  connection stayed in CLOSE-WAIT. So before `http.response.start` the guard waits (bounded) for
  the rest of the body, which Quart keeps receiving (and discards once it is not needed); a body
  that does not arrive in time or exceeds the body limit gets `Connection: close` instead.
- The last send of a response is shielded from cancellation: Hypercorn closes a connection inside
  that send, and quart-trio cancels the request's tasks as soon as the stream ends, which left the
  socket open.
- `on_request_end(scope, callback)` runs callback once the request is over, however it ended (body
  sent, client gone, exception): streaming routes use it to close their engine stream even when
  the response body was never iterated.
- A response body cut off after it started (the request's task cancelled: Hypercorn's graceful
  timeout at shutdown, or an exception) ends with the epilogue its route registered with
  `on_stream_cut` (an SSE error event and `[DONE]`, built only then), sent shielded and
  bounded, so a stream never ends silently after its 200. Where the client is gone the send
  fails quietly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CALLBACKS = "mlctrio.on_request_end"
_CUT = "mlctrio.on_stream_cut"
CUT_SEND_TIMEOUT_S = 2.0


def on_request_end(scope: Any, callback: Callable[[], None]) -> None:
    """Run the synchronous `callback` when the request is over (at most once); `scope` is the
    request's ASGI scope (`quart.request.scope`)."""
    scope.setdefault(_CALLBACKS, []).append(callback)


def on_stream_cut(scope: Any, epilogue: Callable[[], bytes]) -> None:
    """What ends this request's response body if it is cut off after it started; called only
    then (an epilogue may advance per-stream state, e.g. the Responses API's sequence numbers)."""
    scope[_CUT] = epilogue


@attrs.define
class _Body:
    """How much of the request body has arrived."""

    declared: int | None  # Content-Length, None when chunked
    chunked: bool
    received: int = 0
    complete: trio.Event = attrs.field(factory=trio.Event)

    @classmethod
    def of(cls, scope: Scope) -> _Body:
        declared, chunked = None, False
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length" and value.strip().isdigit():
                declared = int(value)
            elif name.lower() == b"transfer-encoding":
                chunked = True
        body = cls(declared, chunked)
        if not chunked and not declared:
            body.complete.set()
        return body

    def note(self, message: Message) -> None:
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete.set()
        elif message["type"] == "http.disconnect":
            self.complete.set()


@attrs.define
class _Response:
    started: bool = False  # http.response.start sent
    ended: bool = False  # the final body message sent


async def _send_epilogue(send: Send, epilogue: bytes) -> None:
    """End a cut-off body with `epilogue`, whatever cancellation is under way; a connection that
    is gone makes this a no-op."""
    with trio.CancelScope(shield=True), trio.move_on_after(CUT_SEND_TIMEOUT_S):
        try:
            await send({"type": "http.response.body", "body": epilogue, "more_body": False})
        except Exception:
            pass


@attrs.frozen
class ConnectionGuard:
    """The ASGI middleware applying this module's rules (see the module docstring)."""

    app: ASGIApp
    max_body_bytes: int
    drain_timeout_s: float = 5.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body.of(scope)

        async def receive_noting() -> Message:
            message = await receive()
            body.note(message)
            return message

        response = _Response()

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body.complete.is_set():
                if not await self._drained(body):
                    headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
                response.ended = True
                return
            await send(message)
            response.started = True

        try:
            await self.app(scope, receive_noting, guarded_send)
        finally:
            try:
                if response.started and not response.ended and _CUT in scope:
                    await _send_epilogue(send, scope[_CUT]())
            finally:
                for callback in scope.pop(_CALLBACKS, ()):
                    callback()

    async def _drained(self, body: _Body) -> bool:
        """Wait for the rest of the body if it is small enough to be worth it."""
        if body.declared is not None and body.declared > self.max_body_bytes:
            return False
        with trio.move_on_after(self.drain_timeout_s):
            await body.complete.wait()
        return body.complete.is_set() and body.received <= self.max_body_bytes
