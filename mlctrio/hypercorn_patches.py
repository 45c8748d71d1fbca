"""Fixes to Hypercorn applied at import (by serve.py, hence for `mlctrio serve` and for
`hypercorn -k trio mlctrio.app:app`, whose app module imports serve.py).

Rules: each patch names the Hypercorn version it was found in and what breaks without it; each
is the smallest change to one function, delegating to the original; remove a patch once the
pinned Hypercorn fixes it.

- `TCPServer._close` (trio, Hypercorn 0.18.0): it calls `send_eof` outside the connection's send
  lock, so closing an HTTP/2 connection while a frame is being sent raises BusyResourceError,
  which ends the whole server (the connection task's exception reaches the server's nursery).
  sglang-router's gRPC health probe (HTTP/2 with prior knowledge) triggers it. Closed under the
  lock (unless the current task already holds it).
- `TCPServer._read_data` (trio, Hypercorn 0.18.0): when the client closes an idle keep-alive
  connection, the read loop ends but the connection's task group still waits for its idle timer,
  so the socket stays in CLOSE-WAIT for the whole keep-alive timeout (75 s here: 200 closed
  connections = 200 descriptors). The idle timer is stopped once the read loop has ended: the
  connection closes at once. (A short keep-alive timeout instead races clients whose own pool
  expiry is the same 5 s, httpx's default: a reused connection closes under a POST.)
- `TCPServer.run` (trio, Hypercorn 0.18.0): an exception raised while handling one connection
  escapes its task into the server's nursery and ends the whole server. Seen twice with
  sglang-router's HTTP/2 probe (the BusyResourceError above, and a KeyError for a stream
  h2 had already dropped). One connection's failure now ends that connection only (it is
  closed as usual) and is logged in one line; cancellation still propagates.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.trio import tcp_server

log = logging.getLogger("mlctrio.server")

_original_close = tcp_server.TCPServer._close


async def _close_under_send_lock(self: Any) -> None:
    if self.send_lock.statistics().owner is trio.lowlevel.current_task():
        return await _original_close(self)
    async with self.send_lock:
        await _original_close(self)


tcp_server.TCPServer._close = _close_under_send_lock  # type: ignore[method-assign]


_original_read_data = tcp_server.TCPServer._read_data


async def _read_data_then_stop_idle_timer(self: Any) -> None:
    try:
        await _original_read_data(self)
    finally:
        with trio.CancelScope(shield=True):
            await self.idle_task.stop()


tcp_server.TCPServer._read_data = _read_data_then_stop_idle_timer  # type: ignore[method-assign]


_original_run = tcp_server.TCPServer.run


async def _run_contained(self: Any) -> None:
    try:
        await _original_run(self)
    except Exception as exc:  # an ExceptionGroup of Exceptions too; never Cancelled
        log.warning("a connection failed and was closed: %s: %s", type(exc).__name__, exc)
        log.debug("connection failure", exc_info=exc)


tcp_server.TCPServer.run = _run_contained  # type: ignore[method-assign]
