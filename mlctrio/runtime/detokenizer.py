"""Incremental detokenization: `WindowDetokenizer` turns a stream of token ids into text as it
becomes final, decoding only a small window of recent tokens per step. It needs only a `decode`
callable and two facts about tokens (which are skipped, which are SentencePiece byte tokens), so
it works for every tokenizer backend; `HFTokenizer.detokenizer()` builds one, and
mlctrio.runtime.tokenizer re-exports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs


@attrs.define
class WindowDetokenizer:
    """Incremental detokenizer with the prefix-offset/read-offset technique over a bounded window.

    Invariants (checked by tests/runtime/test_tokenizer.py's property tests):
    - all push() results + flush() == decode(all pushed ids);
    - text is held back while the window's decode ends with U+FFFD (an unfinished character) or
      while a run of SentencePiece byte tokens is open: `tokenizers`' ByteFallback decodes a run
      all or nothing (one invalid byte turns the whole run into U+FFFDs), so a run is final only
      when a non-byte token follows;
    - each push decodes only the window `ids[prefix_offset:]`, normally 2-3 tokens; a window that
      stays undecidable for `max_pending` tokens is cut where the text can no longer change.
      Byte-token pushes decode nothing, so a long byte run costs one decode when it closes.
    - flush() ends the sequence; pushing afterwards starts a new one.
    """

    _decode: Callable[[Sequence[int]], str]
    _skipped_ids: frozenset[int] = frozenset()
    _byte_run_ids: frozenset[int] = frozenset()
    _max_pending: int = 16
    _window: list[int] = attrs.field(init=False, factory=list)
    _read: int = attrs.field(init=False, default=0)  # window[:_read] is context already emitted
    _prefix_text: str = attrs.field(init=False, default="")  # decode(window[:_read])

    def push(self, token_id: int) -> str:
        """Feed one token; return the text that became final (possibly "")."""
        if token_id in self._skipped_ids:
            # decode() drops them anyway (bytes around them join as if they were not there), so
            # leaving them out saves a decode and keeps runs of them from growing the window.
            return ""
        self._window.append(token_id)
        if token_id in self._byte_run_ids:
            return ""
        text = self._decode(self._window)
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            out = text[len(self._prefix_text) :]
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._prefix_text = self._decode(self._window)
            return out
        if len(self._window) - self._read > self._max_pending:
            return self._cut()
        return ""

    def flush(self) -> str:
        """Return whatever is still held back; the sequence is over afterwards."""
        text = self._decode(self._window)
        out = text[len(self._prefix_text) :]
        self._window, self._read, self._prefix_text = [], 0, ""
        return out

    def _cut(self) -> str:
        """Emit a long undecidable window up to a point that later tokens cannot change.

        Four tokens (at least four bytes) after the cut seal any UTF-8 sequence that starts
        before it; the prefix checks make sure the cut text is what the whole window says.
        """
        k = len(self._window) - 4
        window, read = self._window, self._read
        if k <= read or (window[k - 1] in self._byte_run_ids and window[k] in self._byte_run_ids):
            return ""
        head = self._decode(window[:k])
        new_prefix = self._decode(window[read:k])
        if not (
            new_prefix
            and head.startswith(self._prefix_text)
            and self._decode(window).startswith(head)
            and self._decode(window[read:]).startswith(new_prefix)
        ):
            return ""
        out = head[len(self._prefix_text) :]
        self._window = window[read:]
        self._read = k - read
        self._prefix_text = new_prefix
        return out
