"""An answer sent before the request body arrived (401, 404, 405, 413) leaves the connection
usable: the next request on it is answered, and closed connections do not pile up."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

# The shared server fixtures (tests/server/conftest.py) serve these tests too.
server = _servers.server
server_factory = _servers.server_factory


def _connect(handle: ServerHandle) -> socket.socket:
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_responses(sock: socket.socket, count: int) -> bytes:
    """Read until `count` complete responses (each with a Content-Length) or EOF."""
    data = b""
    while True:
        done, rest = 0, data
        while b"\r\n\r\n" in rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) < length:
                break
            rest = rest[length:]
            done += 1
        if done >= count:
            return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _late_body(sock: socket.socket, method: str, path: str, headers: str = "") -> None:
    body = b'{"model": "mock://echo"}'
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    time.sleep(0.05)  # the scenario, not synchronisation: the body comes after the headers
    sock.sendall(body)


@pytest.mark.parametrize(
    ("method", "path", "status", "keys"),
    [
        ("POST", "/nonexistent", 404, ()),
        ("POST", "/health", 405, ()),
        ("POST", "/v1/chat/completions", 401, ("secret",)),
    ],
)
def test_keep_alive_request_after_an_early_error_is_answered(
    server_factory, method: str, path: str, status: int, keys: tuple[str, ...]
) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(api_keys=keys)
    with _connect(handle) as sock:
        _late_body(sock, method, path)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        data = _read_responses(sock, 2)
    assert data.startswith(f"HTTP/1.1 {status}".encode()), data[:200]
    assert b'"error"' in data
    assert data.count(b"HTTP/1.1 200") == 1, data  # /health answered on the same connection


def test_body_over_the_limit_closes_the_connection(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(max_body_bytes=1000)
    with _connect(handle) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b" " * 100
        )
        data = _read_responses(sock, 2)  # one response, then EOF: the server closed
    assert data.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in data.lower()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_early_errors_do_not_leak_connections(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory()  # in this process: its sockets count in /proc/self/fd
    with _connect(handle) as sock:  # warm up (lazy imports, thread pools)
        _late_body(sock, "POST", "/nonexistent")
        _read_responses(sock, 1)
    baseline = _open_fds()
    for _ in range(40):
        with _connect(handle) as sock:
            _late_body(sock, "POST", "/nonexistent")
            assert _read_responses(sock, 1).startswith(b"HTTP/1.1 404")
    handle.wait_until(lambda: _open_fds() <= baseline + 2, timeout_s=20)
