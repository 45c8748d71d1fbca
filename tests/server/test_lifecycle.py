"""Process-level behaviour: `mlctrio serve` drains on SIGTERM; hypercorn + MLCTRIO_* env."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mlctrio.app import config_from_env
from mlctrio.cli import build_parser, config_from_args
from mlctrio.config import EngineOverrides
from mlctrio.errors import ConfigError

from .test_logging import StderrLines

MODEL = "mock://echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_hypercorn(port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """`hypercorn -k trio mlctrio.app:app` on 127.0.0.1:port, configured by `env`; stderr piped."""
    hypercorn = Path(sys.executable).with_name("hypercorn")
    return subprocess.Popen(
        [str(hypercorn), "-k", "trio", "--bind", f"127.0.0.1:{port}", "mlctrio.app:app"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> StderrLines:
    """Wait for the "ready" line (logged once /health answers 200); the stderr reader."""
    lines = StderrLines(proc)
    lines.wait_for(r"INFO mlctrio: ready: ", timeout_s=60)
    return lines


def _wait_draining(url: str, timeout_s: float = 30) -> httpx.Response:
    """/health once it says the server drains (the signal reaches the server asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health", timeout=5)
        if health.status_code == 503 or time.monotonic() > deadline:
            return health
        time.sleep(0.01)  # a poll interval, not a guess at how long the signal takes


def _reap(proc: subprocess.Popen[str], lines: StderrLines | None = None) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if lines is not None:
        lines.thread.join(10)
    elif proc.stderr is not None:
        proc.stderr.close()


def test_sigterm_drains_then_exits_zero() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlctrio",
            "serve",
            "mock://echo?delay_ms=5",
            "--port",
            str(port),
            "--shutdown-timeout",
            "20",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = None
    try:
        lines = _wait_ready(proc)
        text = "drain " * 60  # 360 tokens at 5 ms: ~2 s of streaming
        result: dict[str, str] = {}
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": text}],
                    "stream": True,
                },
            ) as response:
                chunks = []
                for chunk in response.iter_raw():
                    streaming.set()
                    chunks.append(chunk)
                raw = b"".join(chunks).decode()
            content = ""
            for event in raw.split("\n\n"):
                if event.startswith("data: {"):
                    for c in json.loads(event[6:])["choices"]:
                        content += c["delta"].get("content") or ""
            result["content"] = content
            result["tail"] = raw[-14:]

        worker = threading.Thread(target=stream)
        worker.start()
        assert streaming.wait(30)
        proc.send_signal(signal.SIGTERM)
        health = _wait_draining(url)
        assert health.status_code == 503
        assert health.json() == {"status": "draining"}
        refused = httpx.post(
            url + "/v1/chat/completions",
            timeout=5,
            json={"model": MODEL, "messages": [{"role": "user", "content": "late"}]},
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        worker.join(30)
        # The in-flight stream was allowed to finish.
        assert result["content"] == text
        assert result["tail"] == "data: [DONE]\n\n"
        assert proc.wait(30) == 0
    finally:
        _reap(proc, lines)


def test_sigterm_aborts_what_outlives_the_shutdown_timeout() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlctrio",
            "serve",
            "mock://echo?delay_ms=20",
            "--port",
            str(port),
            "--shutdown-timeout",
            "0.5",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = None
    try:
        lines = _wait_ready(proc)
        holder: dict[str, str] = {}
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                timeout=60,
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x" * 2000}],
                    "stream": True,
                },
            ) as response:
                chunks = []
                for chunk in response.iter_raw():
                    streaming.set()
                    chunks.append(chunk)
                holder["raw"] = b"".join(chunks).decode()

        worker = threading.Thread(target=stream)
        worker.start()
        assert streaming.wait(30)
        proc.send_signal(signal.SIGINT)
        # The stream would take 40 s (2000 tokens at 20 ms): exiting within 30 s means it was
        # aborted after the 0.5 s shutdown timeout.
        assert proc.wait(30) == 0
        worker.join(10)
        raw = holder["raw"]
        assert '"finish_reason":"abort"' in raw
        assert raw.endswith("data: [DONE]\n\n")
    finally:
        _reap(proc, lines)


def test_hypercorn_app_configured_from_env(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        MLCTRIO_MODEL="mock://echo",
        MLCTRIO_SERVED_MODEL_NAME="echo-from-env",
        MLCTRIO_API_KEY="k-env",
        MLCTRIO_ENABLE_DEBUG="1",
        MLCTRIO_OVERRIDES="max_num_sequence=3",
    )
    proc = start_hypercorn(port, env)
    lines = None
    try:
        lines = _wait_ready(proc)
        auth = {"Authorization": "Bearer k-env"}
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["echo-from-env"]
        reply = httpx.post(
            url + "/v1/chat/completions",
            headers=auth,
            timeout=10,
            json={"model": "echo-from-env", "messages": [{"role": "user", "content": "env"}]},
        ).json()
        assert reply["choices"][0]["message"]["content"] == "env"
        config = httpx.get(url + "/debug/config", headers=auth).json()
        assert config["engine"]["max_num_sequence"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        _reap(proc, lines)


def test_cli_and_env_parse_the_same() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "mock://echo",
            "--mode",
            "server",
            "--overrides",
            "max_num_sequence=8;prefill_chunk_size=256",
            "--allow-origins",
            '["http://a"]',
            "--api-key",
            "x",
            "--api-key",
            "y",
            "--request-timeout",
            "3",
            "--enable-tracing",
        ]
    )
    from_cli = config_from_args(args)
    from_env = config_from_env(
        {
            "MLCTRIO_MODEL": "mock://echo",
            "MLCTRIO_MODE": "server",
            "MLCTRIO_OVERRIDES": "max_num_sequence=8;prefill_chunk_size=256",
            "MLCTRIO_ALLOW_ORIGINS": '["http://a"]',
            "MLCTRIO_API_KEY": "x,y",
            "MLCTRIO_REQUEST_TIMEOUT": "3",
            "MLCTRIO_ENABLE_TRACING": "1",
        }
    )
    assert from_cli == from_env
    assert from_cli.overrides == EngineOverrides(max_num_sequence=8, prefill_chunk_size=256)


@pytest.mark.parametrize(
    "text",
    [
        "nonsense=1",
        "max_num_sequence=abc",
        "max_num_sequence=0",
        "novalue",
        "gpu_memory_utilization=1.5",
    ],
)
def test_bad_overrides_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError):
        EngineOverrides.parse(text)


def test_cli_reports_bad_overrides_and_unknown_mock() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "mlctrio", "serve", "--overrides", "warp_speed=9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "unknown key 'warp_speed'" in bad.stderr
    assert "Traceback" not in bad.stderr
    mock = subprocess.run(
        [sys.executable, "-m", "mlctrio", "serve", "mock://parrot", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mock.returncode == 2
    assert "only mock://echo exists" in mock.stderr
    assert "Traceback" not in mock.stderr
