"""Shared by the bench scripts (and tests): a `mlctrio serve` subprocess on a free loopback port
(and its command line), best-of-N timing, the prefill measurement of the runtime benchmarks, a
table printer."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """A port P with P..P+n-1 all free a moment ago, below the kernel's ephemeral range (where
    other processes' outgoing connections and free_port()'s picks land, so a neighbour of an
    ephemeral pick is often taken)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(max(1024, low - 12000), low - n)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no run of {n} free ports found")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlctrio serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)
    raise RuntimeError(f"mlctrio serve did not become healthy in {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it lingers; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def open_mlctrio_server(
    model: str = "mock://echo", args: Sequence[str] = (), startup_timeout_s: float = 60.0
) -> Iterator[str]:
    """Run `python -m mlctrio serve MODEL --port P *args`; yields its base URL.

    The server's output goes to a temporary file rather than a pipe, so a chatty server can never
    block on a full pipe while nobody reads it; the file's tail is shown if the server dies.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlctrio", "serve", model, "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                _wait_healthy(url, proc, startup_timeout_s)
            except RuntimeError as exc:
                log.seek(0)
                raise RuntimeError(
                    f"{exc}:\n{log.read()[-4000:].decode(errors='replace')}"
                ) from None
            yield url
        finally:
            _stop(proc)


def mlctrio_serve_cmd(
    model: str | Path, port: int | str, extra: Sequence[str] = (), *, mode: str = "server"
) -> list[str]:
    """`python -m mlctrio serve MODEL --mode MODE --port PORT --log-level warning *extra` (MODEL: a
    GGUF file, a directory, demo://...; "{port}" may stand for a port picked later)."""
    return [
        sys.executable, "-m", "mlctrio", "serve", str(model), "--mode", mode,
        "--port", str(port), "--log-level", "warning", *extra,
    ]  # fmt: skip


def print_table(
    title: str, cols: list[str], rows: list[dict[str, object]], digits: int = 0
) -> None:
    """A markdown-ish table: a header (`title | col | ...`), a rule, then one line per row
    (floats with `digits` decimals, missing cells as "-")."""
    print(f"{title} | " + " | ".join(cols))
    print("|".join(["---"] * (len(cols) + 1)))
    for row in rows:
        cells = [row.get(c, "-") for c in cols]
        print(
            " | " + " | ".join(f"{c:.{digits}f}" if isinstance(c, float) else str(c) for c in cells)
        )


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls (the machine is shared: the minimum is the least noisy)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def prefill_tok_s(
    runner: Any, vocab_size: int, lengths: Sequence[int], repeat: int
) -> dict[str, float]:
    """`{"prefill<n>": tok/s}` for a TVMRunner: one fresh sequence per measurement (id 999, which
    the decode measurements do not use), random token ids, one warm-up call per length."""
    rng = np.random.default_rng(0)
    out = {}
    for n in lengths:
        toks = rng.integers(0, vocab_size, n).tolist()

        def _prefill(toks: list[int] = toks) -> None:
            runner.add_sequence(999)
            runner.step([(999, toks)])
            runner.remove_sequence(999)

        _prefill()  # warm-up
        out[f"prefill{n}"] = n / best_time(_prefill, repeat)
    return out
