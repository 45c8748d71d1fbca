"""The model's tokenizer as llguidance sees it (`llguidance.LLTokenizer`), for runtime/grammar.py.

Rules: from the HF tokenizer.json when the model has one (llguidance then reads the byte scheme
itself, exactly), else from each token's bytes; the vocabulary width is the model's (masks cover
its padding), the EOS list is the caller's.
"""

from __future__ import annotations

from typing import Any

import llguidance
import tokenizers


def build_ll_tokenizer(tokenizer: Any, n_vocab: int, eos: list[int]) -> llguidance.LLTokenizer:
    """From the HF tokenizer.json when there is one (llguidance then reads the byte scheme
    itself), else from each token's bytes (SentencePiece models loaded without tokenizer.json)."""
    hf = getattr(getattr(tokenizer, "backend", None), "tok", None)
    if isinstance(hf, tokenizers.Tokenizer):
        return llguidance.LLTokenizer(hf.to_str(), n_vocab=n_vocab, eos_token=eos)
    wrapper = llguidance.TokenizerWrapper(_ByteTokens(tokenizer, eos[0]))
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)


class _ByteTokens:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads: token bytes and encode."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_token_ids)

    def __call__(self, text: str | bytes) -> list[int]:
        decoded = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return list(self._tokenizer.encode(decoded))
