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

MODEL = "mock://echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not become healthy")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
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
    )
    try:
        _wait_healthy(url, proc)
        text = "drain " * 60  # 360 tokens at 5 ms: ~2 s of streaming
        result: dict[str, str] = {}

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
                raw = b"".join(response.iter_raw()).decode()
            content = ""
            for event in raw.split("\n\n"):
                if event.startswith("data: {"):
                    for c in json.loads(event[6:])["choices"]:
                        content += c["delta"].get("content") or ""
            result["content"] = content
            result["tail"] = raw[-14:]

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = httpx.get(url + "/health", timeout=5)
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
        _reap(proc)


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
    )
    try:
        _wait_healthy(url, proc)
        holder: dict[str, str] = {}

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
                holder["raw"] = b"".join(response.iter_raw()).decode()

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert time.monotonic() - start < 15
        worker.join(10)
        raw = holder["raw"]
        assert '"finish_reason":"abort"' in raw
        assert raw.endswith("data: [DONE]\n\n")
    finally:
        _reap(proc)


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
    hypercorn = Path(sys.executable).with_name("hypercorn")
    proc = subprocess.Popen(
        [str(hypercorn), "-k", "trio", "--bind", f"127.0.0.1:{port}", "mlctrio.app:app"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_healthy(url, proc)
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
        _reap(proc)


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
