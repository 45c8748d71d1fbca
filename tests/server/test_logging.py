"""What the server logs for a person: one "ready" line (with the URL) once /health answers 200,
and with --access-log / MLCTRIO_ACCESS_LOG=1 one line per request."""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mlctrio.app import config_from_env

from .conftest import ServerHandle

ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1:\d+ "(?P<method>\w+) (?P<path>\S+)" (?P<status>\d+) [\d.]+ ms$'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StderrLines:
    """A subprocess's stderr, line by line, read on a thread (so waits can time out)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:  # closed here, at EOF, by the only reader
            for line in self.proc.stderr:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> str:
        while True:
            line = self._queue.get(timeout=timeout_s)
            assert line is not None, "stderr closed before a match:\n" + "\n".join(self.seen)
            self.seen.append(line)
            if re.search(pattern, line):
                return line


@pytest.fixture
def spawn() -> Iterator[Callable[..., tuple[subprocess.Popen[str], StderrLines]]]:
    procs: list[tuple[subprocess.Popen[str], StderrLines]] = []

    def start(
        argv: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], StderrLines]:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        procs.append((proc, StderrLines(proc)))
        return procs[-1]

    yield start
    for proc, lines in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        lines.thread.join(10)


def test_cli_says_ready_with_the_url_when_health_is_200(spawn) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, lines = spawn(
        [
            sys.executable,
            "-m",
            "mlctrio",
            "serve",
            "mock://echo",
            "--port",
            str(port),
            "--access-log",
        ]
    )
    lines.wait_for(rf"INFO mlctrio: listening on {url} \(loading mock://echo\)$")
    lines.wait_for(rf"INFO mlctrio: ready: serving mock://echo at {url}$")
    assert httpx.get(url + "/health").status_code == 200  # no retry: ready means ready
    access = lines.wait_for(r"mlctrio\.access")
    assert ACCESS_LINE.match(access.split("mlctrio.access: ", 1)[1]), access
    assert '"GET /health" 200' in access
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert sum("ready:" in line for line in lines.seen) == 1
    assert not any("Running on" in line for line in lines.seen), "Hypercorn's duplicate line"


def test_hypercorn_app_logs_ready_and_access_from_env(spawn) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLCTRIO_MODEL": "mock://echo", "MLCTRIO_ACCESS_LOG": "1"}
    hypercorn = Path(sys.executable).with_name("hypercorn")
    proc, lines = spawn(
        [str(hypercorn), "-k", "trio", "--bind", f"127.0.0.1:{port}", "mlctrio.app:app"], env
    )
    lines.wait_for(r"INFO mlctrio: ready: serving mock://echo$")
    assert httpx.get(url + "/v1/models").status_code == 200
    access = lines.wait_for(r"mlctrio\.access")
    assert '"GET /v1/models" 200' in access
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_env_switch_parses_like_the_flag() -> None:
    assert config_from_env({"MLCTRIO_ACCESS_LOG": "1"}).access_log is True
    assert config_from_env({}).access_log is False


def _access_records(caplog: pytest.LogCaptureFixture, *, health: bool = True) -> list[str]:
    """The access-log lines; without the start-up /health polls when `health` is False (a
    poll's line is written after its response ends, so it may land after caplog.clear())."""
    lines = [r.getMessage() for r in caplog.records if r.name == "mlctrio.access"]
    return lines if health else [m for m in lines if '"GET /health"' not in m]


def test_access_log_one_line_per_request_after_the_stream_ends(
    server_factory: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlctrio.access")
    handle = server_factory(access_log=True)
    with handle.client() as client:
        assert client.get("/no/such/route").status_code == 404
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "mock://echo",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        ) as response:
            assert response.status_code == 200
            body = b"".join(response.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")
    handle.wait_until(lambda: len(_access_records(caplog, health=False)) == 2)
    lines = [ACCESS_LINE.match(m) for m in _access_records(caplog, health=False)]
    assert all(lines), _access_records(caplog)
    assert [(m["method"], m["path"], m["status"]) for m in lines if m] == [
        ("GET", "/no/such/route", "404"),
        ("POST", "/v1/chat/completions", "200"),
    ]


def test_no_access_log_by_default(
    server_factory: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    handle = server_factory()
    with handle.client() as client:
        assert client.get("/health").status_code == 200
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready: ")]
    assert ready == [f"ready: serving mock://echo at {handle.url}"]
    assert _access_records(caplog) == []
