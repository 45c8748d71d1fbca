"""Tokenizing long texts without holding up the server: in pieces, one long text at a time.

`encode_text(text, tokenizer, ...)` returns exactly `tokenizer.encode(text, ...)`:

- a text of up to 2 * PIECE_CHARS characters is encoded in one call;
- a longer one is cut about every PIECE_CHARS characters, before a space or newline that follows
  a non-space character, at a cut where encoding the WINDOW characters on each side apart gives
  the same ids as encoding them together (the tokenizer's pre-tokenizer splits there anyway; a
  cut inside a special token, a merged ".\\n" or a whitespace run fails the check and the next
  candidate is tried), and the pieces are encoded in turn under one lock, so long texts share one
  core and the engine keeps the others;
- special tokens (BOS) go with the first piece, where the tokenizer adds them only in front
  (checked on the text's head); otherwise the text is encoded whole;
- with `stop_at`, it stops after the piece that brings the count to `stop_at` and raises the 400
  context_length_exceeded, without tokenizing the rest;
- after a long text, freed memory goes back to the OS (glibc `malloc_trim`), so one big request
  does not leave the process's RSS a gigabyte higher.

HFTokenizer encodes with `encode_batch`, which releases the GIL: while a piece is in Rust, the
event loop and the engine thread run. Runs in a worker thread (`trio.to_thread`), never on the
loop.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Callable, Iterator

from ..engine.tokens import Tokenizer
from ..errors import ContextLengthExceededError

PIECE_CHARS = 16_384
WINDOW = 256
_TRIES_PER_PIECE = 16
_CANDIDATE = re.compile(r"(?<=\S)[ \n]")
_LONG_TEXT_LOCK = threading.Lock()


def too_long(context_window: int, at_least: int, param: str) -> ContextLengthExceededError:
    return ContextLengthExceededError(
        f"This model's maximum context length is {context_window} tokens. However, your prompt "
        f"has at least {at_least} tokens, leaving no room for a completion.",
        param=param,
    )


def encode_text(
    text: str,
    tokenizer: Tokenizer,
    *,
    add_special_tokens: bool = False,
    stop_at: int | None = None,
    param: str = "prompt",
    piece_chars: int = PIECE_CHARS,
) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens)`, long texts in pieces (see the module)."""
    if len(text) <= 2 * piece_chars or (
        add_special_tokens and not _specials_in_front(text, tokenizer)
    ):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids: list[int] = []
    try:
        start = 0
        for end in _cuts(text, tokenizer, piece_chars):
            with _LONG_TEXT_LOCK:
                ids += tokenizer.encode(
                    text[start:end], add_special_tokens=add_special_tokens and start == 0
                )
            start = end
            if stop_at is not None and len(ids) >= stop_at:
                raise too_long(stop_at, len(ids), param)
        return ids
    finally:
        release_memory()


def _specials_in_front(text: str, tokenizer: Tokenizer) -> bool:
    head = text[:WINDOW]
    plain = tokenizer.encode(head, add_special_tokens=False)
    full = tokenizer.encode(head, add_special_tokens=True)
    return len(full) >= len(plain) and full[len(full) - len(plain) :] == plain


def _cuts(text: str, tokenizer: Tokenizer, piece_chars: int) -> Iterator[int]:
    """Where to cut `text` (increasing), then len(text)."""
    start, n = 0, len(text)
    lo = piece_chars
    while lo < n - piece_chars:
        cut = _find_cut(text, lo, min(lo + piece_chars, n - piece_chars), tokenizer)
        if cut is None:
            lo += piece_chars  # no neutral cut here: this piece grows
            continue
        yield cut
        start = cut
        lo = start + piece_chars
    yield n


def _find_cut(text: str, lo: int, hi: int, tokenizer: Tokenizer) -> int | None:
    for tries, match in enumerate(_CANDIDATE.finditer(text, lo, hi)):
        if tries >= _TRIES_PER_PIECE:
            return None
        if _neutral(text, match.start(), tokenizer):
            return match.start()
    return None


def _neutral(text: str, cut: int, tokenizer: Tokenizer) -> bool:
    """Whether the WINDOW characters each side of `cut` encode the same apart and together."""
    left, right = text[max(0, cut - WINDOW) : cut], text[cut : cut + WINDOW]
    return tokenizer.encode(left) + tokenizer.encode(right) == tokenizer.encode(left + right)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
