"""Tokenizers for real models: `HFTokenizer` over HF `tokenizers` (or SentencePiece), and
`load_tokenizer(model_dir)`, which also reads the bos/eos conventions of the model directory.

Where the files come from, in MLC's order of preference:

    tokenizer.json                HF `tokenizers` (BPE, byte-level or SentencePiece-style)
    tokenizer.model               SentencePiece, only if the `sentencepiece` package is installed
    vocab.json + merges.txt       byte-level BPE (GPT-2 style), plus added_tokens.json if present

bos/eos: tokenizer_config.json (`bos_token`, `eos_token`, `add_bos_token`), then
generation_config.json, mlc-chat-config.json and config.json (`bos_token_id`, `eos_token_id`, which
may be a list). The eos ids are the union, generation_config's first.

The adapters over the tokenizer libraries live in runtime/tokenizer_backends.py.
`WindowDetokenizer`, the incremental detokenizer, lives in mlctrio.runtime.detokenizer and is
re-exported here; it needs only `decode` and two facts about tokens (which are skipped, which are
SentencePiece byte tokens), so it works for every backend.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import tokenizers

from mlctrio.errors import ModelLoadError
from mlctrio.runtime.detokenizer import WindowDetokenizer
from mlctrio.runtime.tokenizer_backends import (
    _BYTE_TOKEN,
    _SPM_SPACE,
    SentencePieceBackend,
    _Backend,
    _gpt2_unicode_to_bytes,
    _HFBackend,
)
from mlctrio.runtime.tokenizer_bound import ByteBound

__all__ = ["HFTokenizer", "SentencePieceBackend", "WindowDetokenizer", "load_tokenizer"]
__all__ += ["read_optional_json", "token_content"]

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class HFTokenizer:
    """The `Tokenizer` protocol over HF `tokenizers` or SentencePiece.

    `encode(..., add_special_tokens=True)` adds what the tokenizer's post-processor adds (or,
    when tokenizer_config.json says `add_bos_token`, a BOS), and never doubles a BOS that the
    text already starts with (chat templates usually render `{{ bos_token }}`). Chat prompts
    should be encoded with add_special_tokens=False.
    """

    backend: _Backend
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool | None = None  # None: leave it to the post-processor
    _byte_tokens: dict[int, int] = attrs.field(init=False, factory=dict)
    _max_token_bytes: list[int | None] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        if self.backend.byte_scheme == "byte_fallback":
            for i in range(self.backend.vocab_size):
                token = self.backend.id_to_token(i)
                match = _BYTE_TOKEN.match(token or "")
                if match and i not in self.backend.added_ids:
                    self._byte_tokens[i] = int(match.group(1), 16)

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, **kwargs: Any) -> HFTokenizer:
        """Load a tokenizer.json alone (bos/eos given as keyword arguments)."""
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"cannot load tokenizer {tokenizer_json}: {exc}") from exc
        return cls(_HFBackend(tok), **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self.backend.special_ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def max_token_bytes(self) -> int | None:
        """The most text bytes one token can stand for (its `token_bytes`, added tokens
        included), so a text of B bytes has at least ceil(B / max_token_bytes) tokens; None
        where the tokenizer may drop or shrink text and there is no such bound."""
        if not self._max_token_bytes:
            sound = getattr(self.backend, "byte_bound", None) is not None
            longest = max(len(self.token_bytes(i)) for i in range(self.vocab_size))
            self._max_token_bytes.append(longest if sound else None)
        return self._max_token_bytes[0]

    def min_token_count(self, text: str) -> int:
        """A lower bound on len(encode(text)), without tokenizing (0 where there is none)."""
        longest = self.max_token_bytes
        bound: ByteBound | None = getattr(self.backend, "byte_bound", None)
        if longest is None or bound is None:
            return 0
        return -(-bound.covered_bytes(text) // longest)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not add_special_tokens:
            return self.backend.encode(text, False)
        bos = self.bos_token_id
        if self.add_bos_token is None:
            ids = self.backend.encode(text, True)
        else:
            ids = self.backend.encode(text, False)
            if self.add_bos_token and bos is not None:
                ids = [bos, *ids]
        if bos is not None and ids[:2] == [bos, bos]:
            if self.backend.encode(text, False)[:1] == [bos]:
                ids = ids[1:]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for: byte-level BPE's bytes, SentencePiece's ▁ as a
        space and `<0xNN>` as that byte; added tokens are their literal text."""
        if token_id in self._byte_tokens:
            return bytes([self._byte_tokens[token_id]])
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        if token_id in self.backend.added_ids or token_id in self.backend.special_ids:
            return token.encode("utf-8")
        scheme = self.backend.byte_scheme
        if scheme == "byte_level":
            table = _gpt2_unicode_to_bytes()
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
            return token.encode("utf-8")
        if scheme == "byte_fallback" or _SPM_SPACE in token:
            return token.replace(_SPM_SPACE, " ").encode("utf-8")
        return self.backend.decode([token_id], False).encode("utf-8")

    def detokenizer(self, skip_special_tokens: bool = True) -> WindowDetokenizer:
        return WindowDetokenizer(
            decode=lambda ids: self.backend.decode(ids, skip_special_tokens),
            skipped_ids=self.backend.special_ids if skip_special_tokens else frozenset(),
            byte_run_ids=frozenset(self._byte_tokens),
        )


def read_optional_json(path: Path) -> dict[str, Any]:
    """A JSON object file's contents; {} when the file is absent or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _load_backend(model_dir: Path, tok_config: dict[str, Any]) -> _Backend:
    tokenizer_json = model_dir / "tokenizer.json"
    spm_model = model_dir / "tokenizer.model"
    vocab_json, merges_txt = model_dir / "vocab.json", model_dir / "merges.txt"
    try:
        if tokenizer_json.is_file():
            return _HFBackend(tokenizers.Tokenizer.from_file(str(tokenizer_json)))
        if spm_model.is_file():
            try:
                import sentencepiece
            except ImportError:
                sentencepiece = None
            if sentencepiece is not None:
                return SentencePieceBackend(
                    sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
                )
        if vocab_json.is_file() and merges_txt.is_file():
            return _HFBackend(_byte_level_bpe(model_dir, tok_config))
    except ModelLoadError:
        raise
    except Exception as exc:  # tokenizers/sentencepiece raise assorted exception types
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    if spm_model.is_file():
        raise ModelLoadError(
            f"{spm_model} is a SentencePiece model and there is no tokenizer.json beside it: "
            "install the `sentencepiece` package (pip install sentencepiece) to load it"
        )
    raise ModelLoadError(
        f"no tokenizer in {model_dir}: expected tokenizer.json, tokenizer.model "
        "or vocab.json + merges.txt"
    )


def _byte_level_bpe(model_dir: Path, tok_config: dict[str, Any]) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers

    bpe = models.BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added: dict[int, tuple[str, bool]] = {}
    for id_str, spec in (tok_config.get("added_tokens_decoder") or {}).items():
        content = token_content(spec)
        if content is not None:
            added[int(id_str)] = (content, bool(spec.get("special", True)))
    for content, token_id in read_optional_json(model_dir / "added_tokens.json").items():
        added.setdefault(int(token_id), (content, True))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = token_content(tok_config.get(key))
        if content is not None and content not in {c for c, _ in added.values()}:
            added[bpe.token_to_id(content) or 1 << 30] = (content, True)
    # In id order, so tokens beyond vocab.json get the ids their files promise.
    for _, (content, special) in sorted(added.items()):
        token = tokenizers.AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def load_tokenizer(model_dir: str | Path) -> HFTokenizer:
    """Load the tokenizer of an HF or MLC model directory, with its bos/eos conventions."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    tok_config = read_optional_json(model_dir / "tokenizer_config.json")
    gen_config = read_optional_json(model_dir / "generation_config.json")
    config = read_optional_json(model_dir / "config.json")
    mlc_config = read_optional_json(model_dir / "mlc-chat-config.json")
    backend = _load_backend(model_dir, tok_config)

    def lookup(key: str) -> int | None:
        content = token_content(tok_config.get(key))
        return backend.token_to_id(content) if content is not None else None

    bos = lookup("bos_token")
    # An explicit `"bos_token": null` (Qwen-style) means no BOS, whatever config.json says.
    if bos is None and "bos_token" not in tok_config:
        found = (i for c in (gen_config, mlc_config, config) for i in _ids(c.get("bos_token_id")))
        bos = next(found, None)
    eos: list[int] = []
    eos_tok = lookup("eos_token")
    for token_id in (
        _ids(gen_config.get("eos_token_id"))
        + ([eos_tok] if eos_tok is not None else [])
        + _ids(mlc_config.get("eos_token_id"))
        + _ids(config.get("eos_token_id"))
    ):
        if token_id not in eos:
            eos.append(token_id)
    add_bos = tok_config.get("add_bos_token")
    tokenizer = HFTokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=tuple(eos),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )
    logger.info(
        "tokenizer: %s, vocab %d, bos %s, eos %s", model_dir, tokenizer.vocab_size, bos, eos
    )
    return tokenizer
