"""The tokenizer libraries behind `HFTokenizer` (runtime/tokenizer.py), one adapter each.

    _HFBackend              a `tokenizers.Tokenizer` (HF tokenizer.json, and GGUF vocabularies
                            built as one by runtime/gguf_tokenizer.py)
    SentencePieceBackend    a `sentencepiece.SentencePieceProcessor` (tokenizer.model)

Rules: a backend answers in token ids and text only; bos/eos conventions belong to HFTokenizer.
`encode` must release the GIL for long texts where the library can (`tokenizers`' `encode_batch`
does, `encode` does not), so a long prompt does not stop the event loop or the engine thread.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, Protocol

import tokenizers

from mlctrio.runtime.tokenizer_bound import ByteBound, byte_bound, typed_nodes

ByteScheme = Literal["byte_level", "byte_fallback", "plain"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary mark


@functools.cache
def _gpt2_unicode_to_bytes() -> Mapping[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char each byte is spelled with."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = list(printable)
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + n)
            n += 1
    return MappingProxyType({chr(c): b for b, c in zip(byte_values, chars, strict=True)})


class _Backend(Protocol):
    """What HFTokenizer needs from a tokenizer library."""

    vocab_size: int
    special_ids: frozenset[int]
    added_ids: frozenset[int]  # tokens whose text is literal (not run through the decoder)
    byte_scheme: ByteScheme

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def token_to_id(self, token: str) -> int | None: ...


class _HFBackend:
    """A `tokenizers.Tokenizer` with the facts HFTokenizer needs precomputed.

    `encode` goes through `encode_batch`, which (unlike `encode`) lets go of the GIL while Rust
    works: a long text then does not stop the event loop or the engine thread.
    """

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        spec = json.loads(tok.to_str())
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = spec.get("added_tokens") or []
        self.special_ids = frozenset(int(t["id"]) for t in added if t.get("special"))
        self.added_ids = frozenset(int(t["id"]) for t in added)
        decoder_types = {n["type"] for n in typed_nodes(spec.get("decoder"))}
        model = spec.get("model") or {}
        if "ByteLevel" in decoder_types:
            self.byte_scheme: ByteScheme = "byte_level"
        elif "ByteFallback" in decoder_types or model.get("byte_fallback"):
            self.byte_scheme = "byte_fallback"
        else:
            self.byte_scheme = "plain"
        self.byte_bound: ByteBound | None = byte_bound(
            spec,
            self.byte_scheme,
            has_token=lambda text: tok.token_to_id(text) is not None,
            byte_level_alphabet=_gpt2_unicode_to_bytes(),
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        batch = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(batch[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class SentencePieceBackend:
    """A `sentencepiece.SentencePieceProcessor` (or anything with its API) as a backend.

    Special tokens are SentencePiece's control and unknown pieces. With
    skip_special_tokens=False they are spelled out between the decoded runs.
    """

    byte_scheme: ByteScheme = "byte_fallback"
    added_ids: frozenset[int] = frozenset()

    def __init__(self, processor: Any) -> None:
        self.sp = processor
        self.vocab_size = int(processor.get_piece_size())
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i)
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [int(i) for i in self.sp.encode(text)]
        bos = int(self.sp.bos_id())
        # SentencePiece Llama convention: BOS yes, EOS no.
        return [bos, *ids] if add_special_tokens and bos >= 0 else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    parts.append(str(self.sp.decode(run)) if run else "")
                    parts.append(str(self.sp.id_to_piece(i)))
                    run = []
            else:
                run.append(i)
        if run:
            parts.append(str(self.sp.decode(run)))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return str(self.sp.id_to_piece(token_id))

    def token_to_id(self, token: str) -> int | None:
        token_id = int(self.sp.piece_to_id(token))
        # piece_to_id answers unk for unknown pieces; only unk itself maps to unk.
        if self.sp.is_unknown(token_id) and self.sp.id_to_piece(token_id) != token:
            return None
        return token_id
