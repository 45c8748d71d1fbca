"""The file rules every cache under the cache root follows (compiled libraries, demo models,
embedded model files).

Rules:
- An entry is written under a temporary name in its own folder and renamed into place; the record
  that vouches for it (size + sha256) is written last, itself atomically (`write_atomic`).
- An entry is used only when its files match their record (`check_record`, reading every byte);
  one that does not is reported in one line by `report_corrupt` and rebuilt by its owner.
- `locked` (fcntl.flock on a lock file beside the entry) makes a second process wait for the
  first one's build, then find the entry ready instead of building it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What vouches for a file: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def check_record(path: Path, record: Mapping[str, Any]) -> str | None:
    """None when `path` matches `record` (file_record's dict), else why not, in a few words."""
    try:
        size, sha256 = int(record["size"]), str(record["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"its record is incomplete: {exc!r}"
    try:
        actual = path.stat().st_size
    except OSError:
        return f"{path.name} is missing"
    if actual != size:
        return f"{path.name} is {actual} bytes, its record says {size}"
    if sha256_file(path) != sha256:
        return f"{path.name} fails its sha256 check"
    return None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def report_corrupt(
    log: logging.Logger, entry: Path, reason: str, action: str = "rebuilding"
) -> None:
    """The one line a bad cache entry gets before it is replaced."""
    log.warning("cache entry %s is corrupt (%s); %s", entry, reason, action)
