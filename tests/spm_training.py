"""A small SentencePiece BPE model trained in memory, and its GGUF tokenizer metadata, for the
tokenizer tests (and tests/data/make_spm_gguf_golden.py, which writes it as a GGUF file).

Trained on Python's own help topics plus CJK and emoji lines, with byte fallback and the identity
normalizer (as Llama's tokenizer.model: no NFKC folding, spaces kept, decode(encode(x)) == x).
"""

from __future__ import annotations

import io
import pydoc_data.topics
from typing import Any

import sentencepiece

CJK_LINE = "\n日本語のテキスト。中文文本。emoji 🎉 test 12345.\n"


def train_spm(*, topics: int, vocab_size: int, **options: Any) -> bytes:
    """The serialized model; `options` override or add SentencePieceTrainer options."""
    text = "\n".join(list(pydoc_data.topics.topics.values())[:topics]) + CJK_LINE * 20
    model = io.BytesIO()
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "model_type": "bpe",
        "byte_fallback": True,
        "character_coverage": 0.9995,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "minloglevel": 2,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        **options,
    }
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, **settings
    )
    return model.getvalue()


def spm_gguf_meta(sp: Any, user_defined: tuple[str, ...] = ("<tool>",)) -> dict[str, Any]:
    """The "llama" tokenizer metadata a GGUF file would carry for this SentencePiece model:
    pieces, scores and llama.cpp token types (2 unknown, 3 control, 6 byte, 4 user-defined)."""
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        for test, value in ((sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)):
            if test(i):
                return value
        return 4 if sp.id_to_piece(i) in user_defined else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
