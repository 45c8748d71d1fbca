"""Whether a tokenizer.json pipeline keeps every byte of its input, so token lengths bound counts.

A tokenizer that turns every byte of a text into some token, and whose tokens' `token_bytes`
spell at least what they cover, needs at least ceil(B / longest token) tokens for B bytes: a cheap
lower bound that rejects a too-long prompt without tokenizing it (HFTokenizer.max_token_bytes).
The bound holds only for pipelines that never drop or shrink text, decided here from the
tokenizer.json spec:

    model          BPE, byte-level (all 256 byte characters in the vocabulary) or with
                   byte_fallback (all 256 <0xNN> tokens), so no character is dropped or unknown;
    normalizer     none, or only Prepend and Replace(" " -> "▁") (they add text);
    pre-tokenizer  only splitting ones that keep the text (ByteLevel, Split, Metaspace, Digits,
                   Punctuation, UnicodeScripts; no behavior "Removed");
    added tokens   none with lstrip/rstrip (those swallow any amount of whitespace).

A byte-level vocabulary may lack a few bytes (SmolLM2 lacks some control characters and the lead
bytes of planes 4-16): BPE without an unknown token drops those characters' byte, which
`ByteBound.covered_bytes` subtracts. Anything else (WordPiece, Unigram, NFKC, Strip, Whitespace,
a missing continuation byte...) answers None: no bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

_SPM_SPACE = "\u2581"
_NOT_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])  # bytes no UTF-8 text contains
_KEEPING_PRE_TOKENIZERS = frozenset(
    ["Sequence", "ByteLevel", "Split", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"]
)


def typed_nodes(node: Any) -> list[dict[str, Any]]:
    """Every component with a `type` in a (possibly nested Sequence) tokenizer.json component."""
    if isinstance(node, list):
        return [n for v in node for n in typed_nodes(v)]
    if not isinstance(node, dict):
        return []
    own = [node] if isinstance(node.get("type"), str) else []
    return own + [n for v in node.values() for n in typed_nodes(v)]


def _only_adds_text(normalizer: list[dict[str, Any]], pre: list[dict[str, Any]]) -> bool:
    for node in normalizer:
        space_mark = node.get("pattern") == {"String": " "} and node.get("content") == _SPM_SPACE
        if node["type"] not in ("Sequence", "Prepend") and not (
            node["type"] == "Replace" and space_mark
        ):
            return False
    return all(
        node["type"] in _KEEPING_PRE_TOKENIZERS and node.get("behavior") != "Removed"
        for node in pre
    )


@attrs.frozen
class ByteBound:
    """How many input bytes a pipeline keeps: all of them, less one byte per character matching
    `dropping` (a character whose ASCII or UTF-8 lead byte has no token: BPE without an unknown
    token drops it, e.g. control characters missing from a byte-level vocabulary)."""

    dropping: re.Pattern[str] | None = None

    def covered_bytes(self, text: str) -> int:
        n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if self.dropping is not None:
            n -= len(text) - len(self.dropping.sub("", text))
        return n


def _chars_led_by(byte: int) -> tuple[int, int]:
    """The code points whose UTF-8 encoding is `byte` (ASCII) or starts with it (a lead byte)."""
    if byte < 0x80:
        return byte, byte
    if byte < 0xE0:
        return (byte - 0xC0) << 6, ((byte - 0xC0) << 6) + 0x3F
    if byte < 0xF0:
        return (byte - 0xE0) << 12, ((byte - 0xE0) << 12) + 0xFFF
    return (byte - 0xF0) << 18, min(((byte - 0xF0) << 18) + 0x3FFFF, 0x10FFFF)


def _dropping_pattern(missing: set[int]) -> re.Pattern[str] | None:
    ranges = sorted(_chars_led_by(b) for b in missing)
    if not ranges:
        return None
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]")


def byte_bound(
    spec: Mapping[str, Any],
    byte_scheme: str,
    *,
    has_token: Callable[[str], bool],
    byte_level_alphabet: Mapping[str, int],
) -> ByteBound | None:
    """How the tokenizer.json `spec` keeps input bytes, None where it may drop or shrink text
    beyond what ByteBound accounts for (see the module)."""
    model = spec.get("model") or {}
    pre = typed_nodes(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not _only_adds_text(typed_nodes(spec.get("normalizer")), pre):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None
    if byte_scheme == "byte_level" and any(n["type"] == "ByteLevel" for n in pre):
        missing = {b for c, b in byte_level_alphabet.items() if not has_token(c)} - _NOT_UTF8
        if any(0x80 <= b < 0xC0 for b in missing):
            return None  # a continuation byte: which characters lose it is not worth scanning
        return ByteBound(_dropping_pattern(missing))
    if byte_scheme == "byte_fallback" and model.get("byte_fallback"):
        if all(has_token(f"<0x{b:02X}>") for b in range(256)):
            return ByteBound()
    return None
