"""Run llama-server (and mlctrio) on loopback ports for the benchmarks, and ask for tokens.

`start_server` / `ServerProcess` run a server process on a free loopback port and stop it by PID;
`llama_server_cmd` / `open_llama_server` build and run llama-server's command line (the binary
comes from bench/llama_cpp.py); `greedy_tokens` asks llama-server's native `/completion` endpoint
for greedy continuations of a token-id prompt, with the top log-probabilities of every step (to
tell a real mismatch from a near-tie); `tokenize` is its `/tokenize`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from bench.llama_cpp import ensure_llama_server


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server subprocess on a loopback port; `stop()` ends it by PID (its process group)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    def log_tail(self, max_chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-max_chars:].decode(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaped. Idempotent."""
        if self.proc.poll() is None:
            # The server leads its own process group (start_new_session): signal the group, so
            # helpers it may have spawned go too — but only that group, which we created.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_server(
    name: str,
    cmd: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 600.0,
    log_dir: Path | None = None,
    health_path: str = "/health",
) -> ServerProcess:
    """Start `cmd` (which must listen on 127.0.0.1:`port`) and wait until GET `health_path` is 200.

    Output goes to a log file rather than a pipe, so a chatty server never blocks on a full pipe;
    its tail is shown when the server dies or does not become healthy. llama-server answers 503 on
    /health while it loads the model, mlctrio while it compiles: both count as "not yet".
    """
    url = f"http://127.0.0.1:{port}"
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"{name}-{port}.log"
    log = open(log_path, "w+b")
    proc = subprocess.Popen(
        list(cmd),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # our own process group: Ctrl-C in the terminal is ours to handle
    )
    server = ServerProcess(name, url, proc, log, log_path)
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(url + health_path, timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not healthy after {startup_timeout_s:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise


def llama_server_cmd(
    binary: Path,
    gguf: Path,
    port: int | str,
    *,
    threads: int = 2,
    parallel: int = 1,
    ctx_per_slot: int = 2048,
    extra: Sequence[str] = (),
) -> list[str]:
    """llama-server's command line: `parallel` slots of `ctx_per_slot` tokens each, continuous
    batching, `threads` threads for generation and for prompt processing alike."""
    return [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),  # batch (prompt) threads: default is all cores, pin it like -t
        "-np",
        str(parallel),
        "-c",
        str(ctx_per_slot * parallel),  # -c is the total KV size, split over the slots
        "-cb",  # continuous batching (the default in current trees; explicit for older ones)
        "--no-warmup",  # the benchmark warms up itself; saves start-up time in tests
        *extra,
    ]


@contextlib.contextmanager
def open_llama_server(
    gguf: Path,
    *,
    threads: int = 2,
    parallel: int = 1,
    ctx_per_slot: int = 2048,
    extra: Sequence[str] = (),
    binary: Path | None = None,
) -> Iterator[ServerProcess]:
    """Run llama-server on `gguf` (found or built, see ensure_llama_server) for a `with` block."""
    binary = binary or ensure_llama_server()
    port = free_port()
    cmd = llama_server_cmd(
        binary,
        gguf,
        port,
        threads=threads,
        parallel=parallel,
        ctx_per_slot=ctx_per_slot,
        extra=extra,
    )
    server = start_server("llama-server", cmd, port, startup_timeout_s=300)
    try:
        yield server
    finally:
        server.stop()


# -- greedy generation over /completion ---------------------------------------------------------


@dataclass(frozen=True)
class GreedyResult:
    """Token ids generated greedily, with each step's top alternatives as (id, logprob)."""

    tokens: list[int]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def greedy_tokens(
    url: str,
    prompt_ids: Sequence[int],
    n_predict: int,
    *,
    n_probs: int = 0,
    timeout_s: float = 120.0,
) -> GreedyResult:
    """Greedy continuation of a token-id prompt from llama-server's native /completion.

    `ignore_eos` makes it generate exactly `n_predict` tokens, like mlctrio's `ignore_eos`;
    `cache_prompt: false` keeps one request from reusing another's KV cache, so every call
    computes the same thing. With `n_probs`, the top log-probabilities of each step are those
    before sampling (the model's softmax), as mlctrio's logprobs are.
    """
    body: dict[str, Any] = {
        "prompt": list(prompt_ids),
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,  # greedy even if a future default of temperature 0 changes meaning
        "ignore_eos": True,
        "cache_prompt": False,
        "return_tokens": True,
        "n_probs": n_probs,
        "post_sampling_probs": False,
        "stream": False,
    }
    response = httpx.post(url + "/completion", json=body, timeout=timeout_s)
    response.raise_for_status()
    data = response.json()
    tokens = [int(t) for t in data.get("tokens") or []]
    tops = [
        [(int(alt["id"]), float(alt["logprob"])) for alt in step.get("top_logprobs", [])]
        for step in data.get("completion_probabilities") or []
    ]
    if not tokens:  # older servers without return_tokens: the ids are in the probabilities
        tokens = [int(step["id"]) for step in data.get("completion_probabilities") or []]
    return GreedyResult(tokens, tops)


def tokenize(url: str, text: str, *, parse_special: bool = True) -> list[int]:
    """llama-server's own tokenization of `text` (no BOS/EOS added; with `parse_special`, special
    token strings such as "<|im_end|>" become their ids, as in chat prompts)."""
    body = {"content": text, "add_special": False, "parse_special": parse_special}
    response = httpx.post(url + "/tokenize", json=body, timeout=30)
    response.raise_for_status()
    return [int(t["id"]) if isinstance(t, dict) else int(t) for t in response.json()["tokens"]]
