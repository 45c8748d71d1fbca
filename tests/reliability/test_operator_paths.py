"""What an operator sees when starting or stopping goes wrong (issue 16, item 8), on real
processes: `python -m mlctrio serve ...` and `hypercorn -k trio mlctrio.app:app`.

- A failure is one line on stderr and a non-zero exit, no traceback: an address in use or that
  does not resolve, a model that cannot load, a bad flag value or MLCTRIO_* value.
- `--model X` is the model (vLLM's spelling), never an abbreviation of `--model-lib`.
- The first SIGINT drains; a second one exits at once ("interrupted", 130).
- A signal while the model loads (`mock://echo?load_ms=...`: a load as slow as a compile) stops
  the process without waiting for the load.
- Under Hypercorn a model that fails to load ends the worker with one ERROR line.

Every wait is on a condition (a stderr line, /health, the process's exit) with a generous
timeout.
"""

from __future__ import annotations

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

from mlctrio.cli import DEFAULT_MODEL, build_parser, config_from_args
from mlctrio.errors import ConfigError

EXIT_TIMEOUT_S = 60.0
SLOW_LOAD = "mock://echo?load_ms=600000"  # ten minutes: the test never waits for it
HYPERCORN = str(Path(sys.executable).with_name("hypercorn"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlctrio", "serve", *args]


def _hypercorn(port: int, *extra: str) -> list[str]:
    return [HYPERCORN, "-k", "trio", *extra, "--bind", f"127.0.0.1:{port}", "mlctrio.app:app"]


class _Proc:
    """A subprocess whose stderr is read line by line on a thread (so waits can time out)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout_s: float = EXIT_TIMEOUT_S) -> str:
        while True:
            line = self._lines.get(timeout=timeout_s)
            assert line is not None, f"stderr closed before {pattern!r}:\n" + "\n".join(self.seen)
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def exit_code(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the exit, then for the rest of stderr (all of it lands in `seen`)."""
        code = self.proc.wait(timeout_s)
        self.thread.join(timeout_s)
        while (line := self._lines.get_nowait()) is not None:
            self.seen.append(line)
        return code


@pytest.fixture
def spawn() -> Iterator[Callable[..., _Proc]]:
    procs: list[_Proc] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        procs.append(_Proc(argv, env))
        return procs[-1]

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()
        p.thread.join(10)


def _only_line(p: _Proc) -> str:
    """Exit non-zero with exactly one stderr line, no traceback; that line."""
    assert p.exit_code() != 0
    assert "Traceback" not in "\n".join(p.seen), "\n".join(p.seen)
    assert len(p.seen) == 1, p.seen
    return p.seen[0]


def _health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=10)


# ---- one line, non-zero exit ---------------------------------------------------------------


def test_port_in_use_is_one_line(spawn: Callable[..., _Proc]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = spawn(_serve("mock://echo", "--port", str(port)))
        line = _only_line(p)
    assert line == f"mlctrio: error: cannot listen on 127.0.0.1:{port}: address already in use"


def test_port_in_use_shows_the_traceback_at_debug(spawn: Callable[..., _Proc]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = spawn(_serve("mock://echo", "--port", str(port), "--log-level", "debug"))
        assert p.exit_code() == 2
    assert "Traceback (most recent call last):" in p.seen
    assert p.seen[-1].startswith(f"mlctrio: error: cannot listen on 127.0.0.1:{port}: ")


def test_unknown_host_is_one_line(spawn: Callable[..., _Proc]) -> None:
    p = spawn(_serve("mock://echo", "--host", "no-such-host.invalid", "--port", "0"))
    assert _only_line(p).startswith("mlctrio: error: cannot listen on no-such-host.invalid:0: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "mlctrio: error: --port must be in 0..65535, got 70000"),
        (["--port", "eighty"], "mlctrio serve: error: argument --port: invalid int value"),
        (["--max-body-bytes", "0"], "mlctrio: error: --max-body-bytes must be at least 1"),
        (["--shutdown-timeout", "-1"], "mlctrio: error: --shutdown-timeout must not be negative"),
        (["--overrides", "warp=9"], "mlctrio serve: error: argument --overrides: unknown key"),
        (["--allow-origins", "*"], "mlctrio serve: error: argument --allow-origins: "),
        (["a", "--model", "b"], "mlctrio: error: two models given: MODEL 'a' and --model 'b'"),
        (["--model-l", "x.so"], "mlctrio: error: unrecognized arguments: --model-l"),
        (
            ["--speculative-mode", "small_draft"],
            "mlctrio: error: --speculative-mode small_draft needs a draft model",
        ),
        (["--speculative-mode", "lookahead"], "mlctrio serve: error: argument --speculative-mode"),
    ],
)
def test_bad_flag_values_are_one_line(
    spawn: Callable[..., _Proc], args: list[str], message: str
) -> None:
    p = spawn(_serve(*args))
    assert _only_line(p).startswith(message)
    assert p.proc.returncode == 2


def test_missing_model_file_is_one_line(spawn: Callable[..., _Proc], tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    p = spawn(_serve(str(missing), "--port", "0"))
    assert p.exit_code() == 2
    assert "Traceback" not in "\n".join(p.seen)
    assert p.seen[-1] == (
        f"mlctrio: error: cannot load {missing}: model path {missing} does not exist"
    )
    assert not any("error" in line for line in p.seen[:-1]), p.seen


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("eagle", "--speculative-mode eagle: mock://echo has no hidden states to draft from"),
        ("medusa", "--speculative-mode medusa: mock://echo has no hidden states to draft from"),
        ("small_draft", "mock://echo cannot load a draft model"),
    ],
)
def test_speculative_mode_the_model_cannot_do_is_one_line(
    spawn: Callable[..., _Proc], mode: str, why: str
) -> None:
    extra = ["--additional-models", "mock://echo"] if mode == "small_draft" else []
    p = spawn(_serve("mock://echo", "--port", "0", "--speculative-mode", mode, *extra))
    assert p.exit_code() == 2
    assert "Traceback" not in "\n".join(p.seen)
    assert p.seen[-1].startswith("mlctrio: error: ") and why in p.seen[-1], p.seen


# ---- --model ---------------------------------------------------------------------------------


def test_model_option_is_the_model_not_the_model_lib() -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args(["serve", "--model", "mock://echo"]))
    assert (config.model, config.model_lib) == ("mock://echo", None)
    assert config_from_args(parser.parse_args(["serve"])).model == DEFAULT_MODEL
    assert config_from_args(parser.parse_args(["serve", "demo://tiny"])).model == "demo://tiny"
    with pytest.raises(ConfigError, match="two models given"):
        config_from_args(parser.parse_args(["serve", "demo://tiny", "--model", "mock://echo"]))
    with pytest.raises(SystemExit):  # no abbreviations: --model-l is not --model-lib
        parser.parse_args(["serve", "--model-l", "lib.so"])


def test_serve_with_model_option(spawn: Callable[..., _Proc]) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn(_serve("--model", "mock://echo", "--port", str(port)))
    p.wait_for(r"INFO mlctrio: ready: serving mock://echo at ")
    models = httpx.get(url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["mock://echo"]
    p.proc.send_signal(signal.SIGINT)
    assert p.exit_code() == 0


# ---- signals ---------------------------------------------------------------------------------


def test_second_sigint_exits_at_once(spawn: Callable[..., _Proc]) -> None:
    """The drain would take minutes (a 3000-token echo at 50 ms a token, and a shutdown timeout
    of 10 minutes): the second SIGINT ends the process without waiting for it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn(_serve("mock://echo?delay_ms=50", "--port", str(port), "--shutdown-timeout", "600"))
    p.wait_for(r"INFO mlctrio: ready: ")
    streaming = threading.Event()

    def stream() -> None:
        body = {
            "model": "mock://echo",
            "stream": True,
            "messages": [{"role": "user", "content": "x" * 3000}],
        }
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for _ in r.iter_raw():
                    streaming.set()
        except httpx.HTTPError:  # the server went away mid-stream: expected
            pass

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert streaming.wait(EXIT_TIMEOUT_S)
    p.proc.send_signal(signal.SIGINT)
    p.wait_for(r"received SIGINT: draining")
    assert _health(url).json() == {"status": "draining"}
    p.proc.send_signal(signal.SIGINT)
    assert p.exit_code() == 130
    assert p.seen[-1] == "mlctrio: interrupted"
    assert "Traceback" not in "\n".join(p.seen)
    client.join(EXIT_TIMEOUT_S)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_loading_stops_without_waiting(
    spawn: Callable[..., _Proc], signum: signal.Signals
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn(_serve(SLOW_LOAD, "--port", str(port)))
    p.wait_for(r"INFO mlctrio: listening on ")
    assert _health(url).json() == {"status": "loading"}
    p.proc.send_signal(signum)
    assert p.exit_code() == 0  # well before the ten-minute load
    assert any("stopped before" in line for line in p.seen), p.seen
    assert not any("ready:" in line or "Traceback" in line for line in p.seen), p.seen


@pytest.mark.slow
def test_sigint_during_a_real_first_compile(spawn: Callable[..., _Proc], tmp_path: Path) -> None:
    """demo://tiny with an empty cache compiles on load: SIGINT then stops the process without
    waiting for the compile thread."""
    env = _env(MLCTRIO_CACHE_DIR=str(tmp_path))
    p = spawn(_serve("demo://tiny", "--port", str(_free_port())), env)
    p.wait_for(r"compiling .* \(cache miss", timeout_s=300)
    p.proc.send_signal(signal.SIGINT)
    assert p.exit_code() == 0
    assert any("stopped before demo://tiny was loaded" in line for line in p.seen), p.seen
    assert not any("ready:" in line or "Traceback" in line for line in p.seen), p.seen


# ---- Hypercorn -------------------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCTRIO_")}
    return {**env, **values}


@pytest.mark.parametrize("workers", [[], ["-w", "0"]], ids=["worker-process", "in-process"])
def test_hypercorn_model_that_fails_to_load_ends_the_process(
    spawn: Callable[..., _Proc], tmp_path: Path, workers: list[str]
) -> None:
    """One ERROR line from mlctrio, no traceback, the process ends. With `-w 0` its status
    is 1; with a worker process it is the worker's 1, which Hypercorn 0.18's parent reports
    as 0 (pgjones/hypercorn#269), so only the exit itself is checked there."""
    missing = tmp_path / "missing.gguf"
    p = spawn(_hypercorn(_free_port(), *workers), _env(MLCTRIO_MODEL=str(missing)))
    line = p.wait_for(r"ERROR mlctrio: ", timeout_s=120)
    assert line.endswith(f"cannot load {missing}: model path {missing} does not exist")
    code = p.exit_code()
    if workers:
        assert code == 1
    assert "Traceback" not in "\n".join(p.seen), p.seen


def test_hypercorn_bad_env_value_is_one_line(spawn: Callable[..., _Proc]) -> None:
    p = spawn(_hypercorn(_free_port(), "-w", "0"), _env(MLCTRIO_OVERRIDES="warp=9"))
    assert _only_line(p).startswith("mlctrio: error: argument --overrides: unknown key 'warp'")
    assert p.proc.returncode == 2


def test_hypercorn_sigterm_while_loading_stops(spawn: Callable[..., _Proc]) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn(_hypercorn(port), _env(MLCTRIO_MODEL=SLOW_LOAD))
    p.wait_for(r"Running on http://127\.0\.0\.1:")
    assert _health(url).json() == {"status": "loading"}
    p.proc.send_signal(signal.SIGTERM)
    assert p.exit_code() == 0
    assert any("stopped before" in line for line in p.seen), p.seen


def test_hypercorn_logs_mlctrio_lines_with_its_default_logging(
    spawn: Callable[..., _Proc],
) -> None:
    port = _free_port()
    p = spawn(_hypercorn(port), _env(MLCTRIO_MODEL="mock://echo"))
    p.wait_for(r"^\S+ \S+ INFO mlctrio: ready: serving mock://echo$")
    assert _health(f"http://127.0.0.1:{port}").status_code == 200
    p.proc.send_signal(signal.SIGTERM)
    assert p.exit_code() == 0
