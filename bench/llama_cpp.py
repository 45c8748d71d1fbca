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

Running the servers and asking them for tokens: bench/llama_server.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

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
