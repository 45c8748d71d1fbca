"""The seam between the engine and text: `Tokenizer`, `IncrementalDetokenizer`, `ChatTemplate`.

The HF-tokenizers implementation lives in runtime/tokenizer.py, the byte-level fake for
`mock://echo` in testing/echo.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class IncrementalDetokenizer(Protocol):
    def push(self, token_id: int) -> str:
        """Feed one generated token; return the text that became final.

        Never returns a broken UTF-8 sequence (bytes of an unfinished character are held back) and
        never drops text: the concatenation of all push() results plus flush() equals
        decode(all generated ids).
        """
        ...

    def flush(self) -> str:
        """Return whatever is still held back (at the end of a sequence)."""
        ...


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    @property
    def bos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes this token stands for (for logprobs' `bytes` and `token`)."""
        ...

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer: ...


class ChatTemplate(Protocol):
    @property
    def stop_strings(self) -> Sequence[str]: ...

    @property
    def stop_token_ids(self) -> Sequence[int]: ...

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,  # jinja variables; others ignore them
    ) -> str: ...
