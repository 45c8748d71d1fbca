"""Real processes for the router tests: `mlctrio serve` replicas and sglang-router in front.

Rules: every process logs to a file under the test's tmp dir (printed when a wait fails); waits
poll a condition with a generous deadline, never a fixed sleep; `Cluster.close` stops every
process it started (SIGTERM, then SIGKILL after a grace period) and reaps it.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx

from mlctrio.replicas import ROUTER_FLAGS

MODEL = "mock://echo"
#: 5 ms a step, the prefix cache on (mock://echo has it off unless asked).
ECHO = "mock://echo?delay_ms=5&prefix_cache=1"
_SUCCESS = re.compile(r"^mlctrio_request_success_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@attrs.define
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


@attrs.define
class Cluster:
    """Replicas on `replica_urls`, the router on `url`."""

    tmp: Path
    replicas: list[Proc] = attrs.field(factory=list)
    replica_urls: list[str] = attrs.field(factory=list)
    router: Proc | None = None
    url: str = ""

    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        return Proc(popen, log)

    def start_replicas(self, n: int, model: str = ECHO) -> None:
        for i in range(n):
            port = free_port()
            cmd = [sys.executable, "-m", "mlctrio", "serve", model, "--port", str(port)]
            self.replicas.append(self._spawn(f"replica{i}", cmd))
            self.replica_urls.append(f"http://127.0.0.1:{port}")
        for url in self.replica_urls:
            wait_until(lambda url=url: get_ok(f"{url}/health"), f"{url} ready")

    def start_router(self, policy: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--policy", policy, *ROUTER_FLAGS]
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        self.router = self._spawn("router", [*cmd, "--worker-urls", *self.replica_urls])
        self.url = f"http://127.0.0.1:{port}"
        wait_until(self._router_ready, "the router to list both replicas healthy")

    def _router_ready(self) -> bool:
        try:
            workers = httpx.get(f"{self.url}/workers", timeout=2).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        healthy = [w for w in workers if w["is_healthy"] and w["model_id"] == MODEL]
        return len(healthy) == len(self.replica_urls)

    def served(self) -> list[int]:
        """How many requests each replica has finished (its /metrics)."""
        counts = []
        for url in self.replica_urls:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            counts.append(int(sum(float(v) for v in _SUCCESS.findall(text))))
        return counts

    def close(self) -> None:
        for proc in [*self.replicas, *([self.router] if self.router else [])]:
            proc.stop()

    def logs(self) -> str:
        procs = [*self.replicas, *([self.router] if self.router else [])]
        return "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-3000:]}" for p in procs)
