"""llama.cpp for the comparison benchmarks: build `llama-server` and `llama-quantize` once, run
them, ask the server for tokens.

    python bench/llama_cpp.py                 # build (or find) llama-server, print its path
    python bench/llama_cpp.py --version 0.3.36
    python bench/llama_cpp.py --quantize FILE.gguf --type Q8_0   # print the cached Q8_0 file

`ensure_llama_server()` returns a `llama-server` binary, from (in this order):

1. `$MLCTRIO_LLAMA_SERVER` (a binary you built yourself);
2. the cache, `~/.cache/mlctrio/llama.cpp/<version>/build/bin/llama-server` ($MLCTRIO_CACHE_DIR
   moves `~/.cache/mlctrio`);
3. a fresh build into that cache: `pip download llama-cpp-python==<version> --no-binary :all:`
   fetches the sdist, whose `vendor/llama.cpp` is a pinned llama.cpp source tree, and cmake builds
   it (Release, -DGGML_NATIVE=ON, no curl / OpenSSL / web UI; `-j2`). That takes ~15-30 minutes on
   2 shared cores, once; a file lock keeps two processes from building at the same time.

`find_llama_server()` does 1-2 only (tests use it to skip rather than build). The sources and
the build live only in the cache, never in the repository.

Every binary in BUILD_TARGETS is found the same way (`find_llama_binary(name)`; for
`llama-quantize`, $MLCTRIO_LLAMA_QUANTIZE overrides the cache). `build.ok` lists the cmake flags
and the targets built with them; a target is "cached" only when its binary exists *and* the marker
lists it under the current flags. A missing target in an existing build tree configured with the
same flags is built incrementally (`cmake --build build --target NAME`, minutes: the libraries are
already compiled) and added to the marker; any other case (no tree, other flags) configures and
builds every target.

`quantize_gguf(src, dest, type)` runs `llama-quantize --allow-requantize` (a source that is
already quantized, e.g. SmolLM2's Q4_1, is dequantized and requantized: the result's weights are
the source's rounded again, not the original checkpoint's); `cached_quantized_gguf(src, type)`
keeps the result at `<cache>/gguf/<stem>-<sha256[:12] of src>.<TYPE>.gguf`, written to a temporary
name and renamed, so a half-written file is never found.

`LlamaServer` / `open_server` run a server on a loopback port and stop it by PID; `greedy_tokens`
asks llama-server's native `/completion` endpoint for greedy continuations of a token-id prompt,
with the top log-probabilities of every step (to tell a real mismatch from a near-tie).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from mlctrio.config import cache_root

# The llama-cpp-python release whose vendored llama.cpp we build. Pinned so that every machine
# benchmarks the same llama.cpp (0.3.36 vendors llama.cpp commit 0c1e570, ggml 0.25.3).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # -march=native: what llama.cpp users get when building themselves
    "-DLLAMA_CURL=OFF",  # deprecated in newer trees (a warning), still honoured by older ones
    "-DLLAMA_OPENSSL=OFF",  # no model downloads: we serve local files
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI at configure time
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary, movable and independent of the tree
    # No AMX even where -march=native offers it: llama.cpp 0.3.36's AMX kernels segfault on
    # the q4_0 demo model (ggml_backend_amx_mul_mat, Xeon with amx_int8), and `-nr`, which
    # avoids them at run time, also turns off the AVX-512 weight repacking every other CPU gets.
    # GCC keeps an explicit -mno-* over what -march=native implies. No effect without AMX.
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
)
BUILD_TARGETS = ("llama-server", "llama-quantize")
# $ENV naming a binary built elsewhere, per target
BINARY_ENV = {"llama-server": "MLCTRIO_LLAMA_SERVER", "llama-quantize": "MLCTRIO_LLAMA_QUANTIZE"}


def _cache_root() -> Path:
    return cache_root() / "llama.cpp"


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """`<cache>/llama.cpp/<version>`: src/ (llama.cpp's sources), build/, build.log."""
    return _cache_root() / version


def _built_binary(version: str, name: str = "llama-server") -> Path:
    return cache_dir(version) / "build" / "bin" / name


def _marker_targets(version: str) -> tuple[str, ...]:
    """The targets `build.ok` says were built with the current CMAKE_FLAGS; () when the marker is
    missing, unreadable or from other flags. A marker older than the "targets" key stands for
    llama-server alone (the only target then)."""
    marker = cache_dir(version) / "build.ok"
    with contextlib.suppress(ValueError, OSError, AttributeError):
        data = json.loads(marker.read_text())
        if data.get("flags") == list(CMAKE_FLAGS):
            return tuple(data.get("targets") or ("llama-server",))
    return ()


def find_llama_binary(name: str, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path | None:
    """`name`'s $ENV override (BINARY_ENV) or its cached build; None when neither exists."""
    env = os.environ.get(BINARY_ENV.get(name, ""), "")
    if env:
        path = Path(env).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${BINARY_ENV[name]}={env} is not an executable file")
        return path
    built = _built_binary(version, name)
    # The marker is written after a successful build: a binary it does not list may be
    # half-linked, and one built with other flags is rebuilt (cmake reconfigures the same tree).
    if built.is_file() and name in _marker_targets(version):
        return built
    return None


def find_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path | None:
    """$MLCTRIO_LLAMA_SERVER or the cached build; None when neither exists (nothing is built)."""
    return find_llama_binary("llama-server", version)


def _say(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def _run_logged(cmd: Sequence[str], log: IO[str], *, cwd: Path | None = None) -> None:
    """Run `cmd`, appending its output to `log`; show cmake's `[ NN%]` progress lines."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    last_pct = ""
    tail: list[str] = []
    for line in proc.stdout:
        log.write(line)
        tail = [*tail[-30:], line]
        if line.startswith("[") and "%]" in line[:8]:
            pct = line[1:5].strip()
            if pct != last_pct:  # one line per percent step, not per object file
                last_pct = pct
                _say(f"build {pct} {line[7:].strip()[:90]}")
    if proc.wait() != 0:
        raise RuntimeError(
            f"{cmd[0]} failed (exit {proc.returncode}); last lines:\n{''.join(tail)}"
            f"\nfull log: {log.name}"
        )


def _fetch_sources(version: str, dest: Path, log: IO[str]) -> None:
    """Put llama-cpp-python's vendored llama.cpp tree at `dest` (via pip's sdist download)."""
    with tempfile.TemporaryDirectory() as tmp:
        _say(f"downloading the llama-cpp-python {version} sdist (llama.cpp's sources)")
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={version}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
            ],
            log,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"expected one sdist in {tmp}, found {sdists}")
        _say(f"extracting vendor/llama.cpp from {sdists[0].name}")
        with tarfile.open(sdists[0]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(Path(tmp) / "src", members=[m for m in members if m.name], filter="data")
        shutil.move(str(Path(tmp) / "src"), dest)


def _write_marker(version: str, targets: Sequence[str]) -> None:
    (cache_dir(version) / "build.ok").write_text(
        json.dumps({"version": version, "flags": CMAKE_FLAGS, "targets": list(targets)}) + "\n"
    )


def _cmake_build(root: Path, targets: Sequence[str], jobs: int, log: IO[str]) -> None:
    build = ["cmake", "--build", str(root / "build"), "--config", "Release", f"-j{jobs}"]
    _run_logged([*build, "--target", *targets], log)


def build_llama_cpp(
    version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2, targets: Sequence[str] = BUILD_TARGETS
) -> None:
    """Build `targets` into the cache: incrementally in a tree already configured with CMAKE_FLAGS
    (only the missing targets; what is built stays), else sources (if needed), configure, and every
    target of BUILD_TARGETS plus `targets`."""
    root = cache_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    built = _marker_targets(version)
    missing = [t for t in targets if t not in built or not _built_binary(version, t).is_file()]
    if not missing:
        return
    with open(root / "build.log", "a") as log:
        start = time.monotonic()
        if built and (root / "build" / "CMakeCache.txt").is_file():
            _say(f"building {', '.join(missing)} in {root / 'build'} (incremental, -j{jobs})")
            _cmake_build(root, missing, jobs, log)
            _write_marker(version, [*built, *missing])
        else:
            src = root / "src"
            if not (src / "CMakeLists.txt").is_file():
                shutil.rmtree(src, ignore_errors=True)
                _fetch_sources(version, src, log)
            _say(f"configuring {src} (log: {log.name})")
            _run_logged(["cmake", "-S", str(src), "-B", str(root / "build"), *CMAKE_FLAGS], log)
            everything = list(dict.fromkeys([*BUILD_TARGETS, *targets]))
            _say(f"building {', '.join(everything)} with -j{jobs}: ~15-30 min on 2 cores, once")
            _cmake_build(root, everything, jobs, log)
            _write_marker(version, everything)
        _say(f"built in {time.monotonic() - start:.0f} s")


def build_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """Download llama.cpp's sources (if needed) and build llama-server into the cache."""
    build_llama_cpp(version, jobs, ("llama-server",))
    return _built_binary(version)


def ensure_llama_binary(name: str, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """A llama.cpp binary (one of BUILD_TARGETS): found, else built once into the cache (under a
    file lock: another process may be building the same tree)."""
    found = find_llama_binary(name, version)
    if found is not None:
        return found
    cache_dir(version).mkdir(parents=True, exist_ok=True)
    with open(cache_dir(version) / ".lock", "w") as lock:
        _say("waiting for the build lock" if _locked(lock) else "took the build lock")
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building: wait for it
        found = find_llama_binary(name, version)
        if found is None:
            build_llama_cpp(version, jobs, (name,))
            found = _built_binary(version, name)
        return found


def ensure_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2) -> Path:
    """A llama-server binary: found (see the module docstring), else built once into the cache."""
    return ensure_llama_binary("llama-server", version, jobs)


def _locked(lock: IO[str]) -> bool:
    """True when another process holds `lock` (probing without taking it for long)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def llama_server_version(binary: Path) -> str:
    """`llama-server --version`'s first line (build number and commit)."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0] if lines else "unknown"


# -- llama-quantize ------------------------------------------------------------------------------

# llama-quantize's type names (its QUANT_OPTIONS) that the benchmarks use; any other name it knows
# works too, these are only checked for spelling.
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K_M")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def quantized_name(src: Path, qtype: str, sha256: str) -> str:
    """`<stem>-<sha256[:12]>.<TYPE>.gguf`: the source's content, not its path, keys the file."""
    return f"{src.name.removesuffix('.gguf')}-{sha256[:12]}.{qtype.upper()}.gguf"


def quantize_gguf(
    src: Path, dest: Path, qtype: str, *, threads: int = 2, binary: Path | None = None
) -> Path:
    """`llama-quantize --allow-requantize SRC DEST TYPE THREADS`; DEST appears only when done."""
    binary = binary or ensure_llama_binary("llama-quantize")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    cmd = [str(binary), "--allow-requantize", str(src), str(tmp), qtype.upper(), str(threads)]
    _say(f"quantizing {src.name} to {qtype.upper()}: {dest}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            tail = (out.stdout + out.stderr)[-3000:]
            raise RuntimeError(f"llama-quantize failed (exit {out.returncode}):\n{tail}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cached_quantized_gguf(src: Path, qtype: str, *, threads: int = 2) -> Path:
    """`src` requantized to `qtype` with llama-quantize, once: under `<cache>/gguf/` (see the
    module docstring), made under a file lock so two processes do not both write it."""
    src = Path(src).resolve()
    root = cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / quantized_name(src, qtype, file_sha256(src))
    if dest.is_file():
        return dest
    with open(root / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_file():
            quantize_gguf(src, dest, qtype, threads=threads)
    return dest


# -- running servers ---------------------------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build (once) or find llama.cpp's llama-server.")
    p.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist")
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--quantize", type=Path, metavar="GGUF", help="requantize this file (cached)")
    p.add_argument("--type", default="Q8_0", help=f"with --quantize: e.g. {', '.join(QUANT_TYPES)}")
    args = p.parse_args(argv)
    if args.quantize is not None:
        ensure_llama_binary("llama-quantize", args.version, args.jobs)
        print(cached_quantized_gguf(args.quantize, args.type))
        return 0
    binary = ensure_llama_server(args.version, args.jobs)
    print(binary)
    print(llama_server_version(binary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
