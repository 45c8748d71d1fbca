"""Issue 16 item 4: a corrupt cache entry is detected, logged in one line and rebuilt; two
processes building the same entry together build it once.

Fast tests use the demo model cache (real, built in a fraction of a second) and the compile
cache's own checks with a stand-in compiler; the slow ones compile `demo://tiny` for real and
load the rebuilt library in a child process (a regression there would SIGBUS that process, not
pytest). Builds are counted by what the builders record, never inferred from timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mlctrio.models import compile as compile_mod
from mlctrio.models import demo
from mlctrio.models.llama_config import TINY

WAIT_S = 120.0


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(max(path.stat().st_size, 64)))
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(how)


def _corrupt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]


# -- the demo model cache ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("model.safetensors", "truncate"),
        ("model.safetensors", "garbage"),
        ("tokenizer.json", "empty"),
        ("config.json", "delete"),
        (demo.MANIFEST, "empty"),
        (demo.MANIFEST, "garbage"),
    ],
)
def test_corrupt_demo_model_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, how: str
) -> None:
    path = demo.ensure_demo_model("tiny", cache_dir=tmp_path)
    pristine = {p.name: p.read_bytes() for p in path.iterdir()}
    _corrupt(path / name, how)
    with caplog.at_level(logging.WARNING, logger="mlctrio.models.demo"):
        again = demo.ensure_demo_model("tiny", cache_dir=tmp_path)
    assert again == path
    assert {p.name: p.read_bytes() for p in path.iterdir()} == pristine
    lines = _corrupt_lines(caplog)
    assert len(lines) == 1 and str(path) in lines[0] and lines[0].endswith("; rebuilding")
    assert demo.manifest_problem(path) is None
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix != ".lock") == [path.name]


def test_sound_demo_model_is_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = demo.ensure_demo_model("tiny", cache_dir=tmp_path)

    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt a sound entry")

    monkeypatch.setattr(demo, "write_demo_model", refuse)
    assert demo.ensure_demo_model("tiny", cache_dir=tmp_path) == path


# A child process that builds the demo model through a wrapper recording each build. The "first"
# one, once building, waits until another process is blocked on the entry's lock (/proc/locks
# lists blocked flock waiters with "->"): so the second really arrives mid-build. Without the
# lock the second never blocks: the first times out, both build, and the count says so.
_DEMO_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlctrio.models import demo

    cache, work, role = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    lock = cache / "demo" / f".{demo.demo_cache_key('tiny')}.lock"
    original = demo.write_demo_model

    def blocked_waiters():
        if not lock.exists():
            return []
        inode = lock.stat().st_ino
        with open("/proc/locks") as f:
            return [l for l in f if "->" in l and l.split()[6].endswith(f":{inode}")]

    def wait_for(predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.01)

    def recorded(out, preset="tiny", seed=0):
        with open(work / "builds.log", "a") as f:
            f.write(role + "\\n")
        if role == "first":
            (work / "first-building").touch()
            wait_for(blocked_waiters, 20.0)
        return original(out, preset, seed)

    demo.write_demo_model = recorded
    if role == "second":
        wait_for((work / "first-building").exists, 60.0)
    print(demo.ensure_demo_model("tiny", cache_dir=cache))
    """
)


def test_two_processes_build_the_demo_model_once(tmp_path: Path) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DEMO_CHILD, str(cache), str(work), role],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("first", "second")
    ]
    outs = [p.communicate(timeout=WAIT_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # the same directory
    assert (work / "builds.log").read_text().split() == ["first"]
    assert demo.manifest_problem(Path(outs[0][0].strip())) is None


# -- the compile cache, with a stand-in compiler ------------------------------------------------


@pytest.fixture
def fake_compiler(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the TVM compile (tens of seconds) with one that writes a fake library through the
    real entry-writing path; returns the list of keys it compiled."""
    compiled: list[str] = []

    class FakeExecutable:
        def export_library(self, path: str) -> None:
            Path(path).write_bytes(hashlib.sha256(path.encode()).digest() * 4096)

    def fake_compile(mod: object, target: object, relax_pipeline: object) -> FakeExecutable:
        return FakeExecutable()

    def fake_build(config: object, quantization: str, target: object) -> tuple[object, list]:
        compiled.append(quantization)
        return object(), []

    monkeypatch.setattr(compile_mod, "build_irmodule", fake_build)
    monkeypatch.setattr(compile_mod, "attach_build_info", lambda mod, info: mod)
    monkeypatch.setattr(compile_mod.tvm, "compile", fake_compile)
    return compiled


@pytest.mark.parametrize(
    ("suffix", "how"),
    [
        (".so", "truncate"),
        (".so", "garbage"),
        (".so", "delete"),
        (".json", "empty"),
        (".json", "garbage"),
        (".json", "delete"),
    ],
)
def test_corrupt_compile_entry_is_rebuilt(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fake_compiler: list[str],
    suffix: str,
    how: str,
) -> None:
    first = compile_mod.compile_model(TINY, "q0f32", cache_dir=tmp_path)
    assert not first.cache_hit and fake_compiler == ["q0f32"]
    assert compile_mod.compile_model(TINY, "q0f32", cache_dir=tmp_path).cache_hit
    _corrupt(first.lib_path.with_suffix(suffix), how)
    with caplog.at_level(logging.WARNING, logger="mlctrio.models.compile"):
        again = compile_mod.compile_model(TINY, "q0f32", cache_dir=tmp_path)
    assert not again.cache_hit and fake_compiler == ["q0f32", "q0f32"]
    lines = _corrupt_lines(caplog)
    assert len(lines) == 1 and first.lib_path.name in lines[0], lines
    assert compile_mod.compile_model(TINY, "q0f32", cache_dir=tmp_path).cache_hit
    meta = json.loads(first.lib_path.with_suffix(".json").read_text())
    assert meta["size"] == first.lib_path.stat().st_size
    assert meta["sha256"] == hashlib.sha256(first.lib_path.read_bytes()).hexdigest()


def test_metadata_is_written_after_the_library(tmp_path: Path, fake_compiler: list[str]) -> None:
    """A process killed between the two writes leaves a library without metadata: rebuilt."""
    entry = compile_mod.compile_model(TINY, "q0f32", cache_dir=tmp_path)
    meta = entry.lib_path.with_suffix(".json")
    assert meta.stat().st_mtime_ns >= entry.lib_path.stat().st_mtime_ns
    infos, problem = compile_mod.read_entry(entry.lib_path, meta, "another-key")
    assert infos is None and problem is not None and "another entry" in problem
    meta.unlink()
    infos, problem = compile_mod.read_entry(entry.lib_path, meta, "k")
    assert infos is None and problem == "library without metadata"
    entry.lib_path.unlink()
    assert compile_mod.read_entry(entry.lib_path, meta, "k") == (None, None)  # plain miss
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [f".{entry.lib_path.stem}.lock"]  # no temporary file left behind


# -- the real thing: demo://tiny compiled, corrupted, loaded ------------------------------------

_LOAD_CHILD = textwrap.dedent(
    """
    import logging, sys
    import numpy as np
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from mlctrio.config import ServerConfig
    from mlctrio.runtime.model_loader import load_model

    core, info = load_model(ServerConfig(model="demo://tiny", mode="interactive"))
    core.runner.add_sequence(0)
    logits = core.runner.step([(0, [1, 2, 3, 4])])
    assert np.isfinite(logits).all() and logits.std() > 0, logits
    core.close()
    print("loaded", info.config["source"])
    """
)


def _load_child(cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MLCTRIO_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", _LOAD_CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding demo://tiny and its compiled library (compiled once per module)."""
    cache = tmp_path_factory.mktemp("cache")
    out, _ = _finish(_load_child(cache))
    assert "loaded compiled" in out
    return cache


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suffix", "how"),
    [(".so", "truncate"), (".so", "garbage"), (".json", "empty"), (".json", "garbage")],
)
def test_corrupt_library_is_rebuilt_and_loads(
    compiled_cache: Path, tmp_path: Path, suffix: str, how: str
) -> None:
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(compiled_cache, cache)
    (lib,) = (cache / "lib").glob("*.so")
    _corrupt(lib.with_suffix(suffix), how)
    out, err = _finish(_load_child(cache))
    assert "loaded compiled" in out
    corrupt = [line for line in err.splitlines() if "is corrupt" in line]
    assert len(corrupt) == 1 and lib.name in corrupt[0] and "rebuilding" in corrupt[0], err
    out, err = _finish(_load_child(cache))  # and the rebuilt entry is a sound cache hit
    assert "loaded cache" in out and "is corrupt" not in err


@pytest.mark.slow
def test_two_processes_compile_the_library_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [_load_child(cache) for _ in range(2)]
    results = [_finish(p) for p in procs]
    compiles = sum(err.count("(cache miss, key") for _, err in results)
    assert compiles == 1, [err[-2000:] for _, err in results]
    assert sorted(out.split()[-1] for out, _ in results) == ["cache", "compiled"]
    assert len(list((cache / "lib").glob("*.so"))) == 1
