"""A real mlctrio server (Hypercorn + engine thread + echo fake) in a background thread.

Tests talk to it over loopback HTTP with httpx or the official openai SDK, exactly as users do.

Rules: waits are on conditions with generous timeouts, never fixed sleeps; a server that fails to
start is stopped before the error propagates; `server_factory` stops its servers even when one
stop fails, then collects garbage, so a socket a test left unclosed is reported (as a
ResourceWarning, an error under `filterwarnings = error`) in that test, not in a random later one.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio

from mlctrio.config import ServerConfig
from mlctrio.model_loads import ModelSet
from mlctrio.serve import RunningServer, serve


@attrs.define
class ServerHandle:
    config: ServerConfig
    running: RunningServer | None = None
    token: trio.lowlevel.TrioToken | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    @property
    def engine(self) -> Any:
        assert self.running is not None
        return self.running.state.engine

    def core_stats(self) -> Any:
        return self.engine.stats()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def wait_until(
        self, predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll `predicate` until it holds; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"{what} not reached in {timeout_s} s")

    def wait_quiescent(self, timeout_s: float = 10.0) -> None:
        """No request in flight, nothing running or waiting, every KV page free."""

        def idle() -> bool:
            stats = self.core_stats()
            return (
                self.engine.num_in_flight == 0
                and stats.num_running == 0
                and stats.num_waiting == 0
                and stats.free_pages == stats.total_pages
            )

        self.wait_until(idle, timeout_s)

    def stop(self) -> None:
        if self.running is not None and self.token is not None:
            try:
                self.token.run_sync_soon(self.running.shutdown.set)
            except trio.RunFinishedError:
                pass
        if self.thread is not None:
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "server thread did not stop"


def start_server(
    config: ServerConfig,
    ping_interval_s: float = 10.0,
    load_timeout_s: float = 60.0,
    *,
    models: ModelSet | None = None,
    wait_ready: bool = True,
) -> ServerHandle:
    """Serve `config` in a thread; return once /health says ready (the model is loaded: a real
    model that compiles on first use needs a `load_timeout_s` of minutes), or once it listens
    without `wait_ready`. `models`: the models to serve as built by the test (default: as
    `mlctrio serve` builds them). The timeouts are generous because a cold, shared 2-core
    machine is slow; a healthy start takes well under a second with mock://echo."""
    handle = ServerHandle(config)
    ready = threading.Event()

    async def main() -> None:
        handle.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            handle.running = await nursery.start(
                partial(
                    serve,
                    config,
                    handle_signals=False,
                    sse_ping_interval_s=ping_interval_s,
                    models=models,
                )
            )
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test that waits for readiness
            handle.error = exc
        finally:
            ready.set()

    handle.thread = threading.Thread(target=run, name="mlctrio-test-server", daemon=True)
    handle.thread.start()
    try:
        assert ready.wait(120), "the test server did not bind in 120 s"
        if handle.error is not None:
            raise handle.error
        assert handle.running is not None
        if not wait_ready:
            return handle
        with httpx.Client(base_url=handle.url) as client:
            handle.wait_until(
                partial(_healthy, handle, client), load_timeout_s, f"/health 200 ({config.model})"
            )
    except BaseException:
        handle.stop()  # never leave a half-started server running behind a failed test
        raise
    return handle


def _healthy(handle: ServerHandle, client: httpx.Client) -> bool:
    """/health answers 200; raises what killed the server thread, if it died while loading."""
    if handle.error is not None:
        raise handle.error
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:  # busy machine: a slow answer is asked again
        return False


def raw_chat_post(handle: ServerHandle, body: dict[str, Any]) -> socket.socket:
    """POST a chat completion on a bare socket (the caller closes it: a client disconnect)."""
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
    except BaseException:
        sock.close()
        raise
    return sock


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += float(value)
    return total


def make_config(**kwargs: Any) -> ServerConfig:
    kwargs.setdefault("model", "mock://echo")
    kwargs.setdefault("port", 0)
    return ServerConfig(**kwargs)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    """The shared default server: mock://echo, no auth, no CORS, debug and tracing on."""
    handle = start_server(make_config(model="mock://echo", enable_debug=True, enable_tracing=True))
    yield handle
    handle.stop()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerHandle]]:
    """Start servers with special configurations; all are stopped at the end of the test."""
    handles: list[ServerHandle] = []

    def factory(
        ping_interval_s: float = 10.0,
        *,
        models: Callable[[ServerConfig], ModelSet] | None = None,
        wait_ready: bool = True,
        **kwargs: Any,
    ) -> ServerHandle:
        """`models`: builds the ModelSet to serve from the config (default: as the CLI does)."""
        config = make_config(**kwargs)
        model_set = models(config) if models is not None else None
        handle = start_server(config, ping_interval_s, models=model_set, wait_ready=wait_ready)
        handles.append(handle)
        return handle

    yield factory
    errors = []
    for handle in handles:
        try:
            handle.stop()
        except Exception as exc:  # stop the others anyway
            errors.append(exc)
    handles.clear()
    gc.collect()  # finalize this test's garbage now: an unclosed socket warns in this test
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def demo_server() -> Iterator[ServerHandle]:
    """The real TVM engine on the tiny demo model (compiled once per machine, cached)."""
    from mlctrio.config import EngineOverrides

    handle = start_server(
        make_config(
            model="demo://tiny",
            mode="server",
            overrides=EngineOverrides(
                max_num_sequence=16, max_total_seq_length=16384, prefill_chunk_size=256
            ),
            enable_debug=True,
        ),
        load_timeout_s=600,  # a machine without the compile cache generates and compiles first
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def closing_bias(demo_server: ServerHandle) -> dict[str, int]:
    """+2 for tokens that end a string/array/object, -2 for openers and pure whitespace."""
    bias: dict[str, int] = {}
    with httpx.Client(base_url=demo_server.url) as http:
        for token in range(demo_server.engine.info.tokenizer.vocab_size):
            text = http.post("/detokenize", json={"tokens": [token]}).json()["prompt"]
            if text.rstrip().endswith(('"', "}", "]")):
                bias[str(token)] = 2
            elif ("{" in text or "[" in text) or (text and not text.strip()):
                bias[str(token)] = -2
    return bias
