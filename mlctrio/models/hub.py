"""Where a model lives: a local path, or `HF://org/name[@revision]` in the huggingface_hub cache.

`resolve_model_path("HF://org/name")` finds a model in the huggingface_hub cache, downloading it
there first when it is missing (not with HF_HUB_OFFLINE=1). HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE
and HF_HUB_OFFLINE are read when called, not at import. Only the files a model needs are fetched
(`HF_WANTED`; a GGUF only when the repository has no other weights), with huggingface_hub's
progress bars on a TTY and log lines otherwise.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from mlctrio.errors import ModelLoadError
from mlctrio.progress import Progress

logger = logging.getLogger(__name__)


def hf_hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


# What a model directory needs from a Hub repository: configs, tokenizer files, and safetensors
# or MLC weights. A GGUF only when the repository has neither (and then exactly one GGUF).
HF_WANTED = (
    "*.json",
    "*.safetensors",
    "params_shard_*.bin",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_path(model: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """A local model directory for `model`: a path, or "HF://org/name[@revision]" from the
    huggingface_hub cache (`cache_dir`, default `hf_hub_cache_dir()`), downloaded into it first
    when missing (only the files in HF_WANTED; a GGUF if there is no other weight).

    HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read now. Offline, only the cache is looked at.
    Progress: huggingface_hub's bars on a terminal, about ten log lines otherwise."""
    text = str(model)
    if not text.lower().startswith("hf://"):
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {path} does not exist")
        return path
    repo_id, _, revision = text[len("hf://") :].strip("/").partition("@")
    cache = Path(cache_dir) if cache_dir is not None else hf_hub_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=list(HF_WANTED),  # complete = the files we download are all there
        )
        return Path(folder)
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        if _truthy("HF_HUB_OFFLINE"):
            raise ModelLoadError(
                f"{text} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                f"download it first, e.g. `huggingface-cli download {repo_id}`, or set "
                "HF_HUB_CACHE"
            ) from exc
    except (HFValidationError, ValueError) as exc:
        raise ModelLoadError(f"{text} is not a valid Hugging Face model id: {exc}") from exc
    return _hf_download(text, repo_id, revision or None, cache)


def _hf_download(text: str, repo_id: str, revision: str | None, cache: Path) -> Path:
    """Download what a model needs from the Hub (or its HF_ENDPOINT stand-in) into `cache`."""
    import time

    from huggingface_hub import constants, snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once, when first imported; we promise to read it
    # now (we only get here when it is unset), so its frozen copy must not veto the download.
    constants.HF_HUB_OFFLINE = False
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None  # None: huggingface_hub's saved token, if any
    where = endpoint or "the Hugging Face Hub"
    where_from: dict[str, Any] = {
        "revision": revision, "cache_dir": cache, "endpoint": endpoint, "token": token
    }  # fmt: skip
    try:
        listing = snapshot_download(
            repo_id,
            allow_patterns=[*HF_WANTED, "*.gguf"],
            dry_run=True,
            tqdm_class=_hub_tqdm_class(None),
            **where_from,
        )
        names = [f.filename for f in listing]
        patterns = list(HF_WANTED)
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            ggufs = sorted(n for n in names if n.endswith(".gguf"))
            if len(ggufs) > 1:
                raise ModelLoadError(
                    f"{text} has no safetensors weights and {len(ggufs)} GGUF files "
                    f"({', '.join(ggufs)}): download the one you want with `huggingface-cli "
                    f"download {repo_id} FILE` and serve its path"
                )
            patterns += ggufs
        chosen = [f for f in listing if any(fnmatch.fnmatch(f.filename, p) for p in patterns)]
        missing = [f for f in chosen if f.will_download]
        size = sum(f.file_size or 0 for f in missing)
        logger.info(
            "downloading %s from %s: %d files, %.1f MB, into %s",
            text, where, len(missing), size / 1e6, cache,
        )  # fmt: skip
        started = time.monotonic()
        with Progress(f"downloading {text}", size, "bytes", logger=logger) as progress:
            folder = snapshot_download(
                repo_id,
                allow_patterns=patterns,
                tqdm_class=_hub_tqdm_class(progress),
                **where_from,
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # huggingface_hub and httpx raise many kinds: one line for each
        from huggingface_hub.errors import HFValidationError

        if isinstance(exc, HFValidationError):
            raise ModelLoadError(f"{text} is not a valid Hugging Face model id: {exc}") from exc
        reason = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())
        raise ModelLoadError(
            f"cannot download {text} from {where}: {type(exc).__name__}: {reason} (HF_TOKEN for "
            "a private or gated model; HF_HUB_OFFLINE=1 to use the cache only)"
        ) from exc
    logger.info("downloaded %s in %.1f s: %s", text, time.monotonic() - started, folder)
    return Path(folder)


def _hub_tqdm_class(progress: Progress | None) -> type[Any] | None:
    """The tqdm class huggingface_hub draws its bars with: its own on a terminal; otherwise a
    silent one whose byte counts (of the "Downloading bytes" bar) feed `progress`'s log lines."""
    from tqdm import tqdm

    if progress is not None and progress.bar:
        return None

    class HubTqdm(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            desc = str(kwargs.get("desc") or "")
            self.feeds = progress is not None and desc.startswith("Downloading")
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            if self.feeds and progress is not None:
                progress.advance(int(n or 0))
            done: bool | None = super().update(n)
            return done

    return HubTqdm
