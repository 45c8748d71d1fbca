"""A small SentencePiece BPE model trained in memory, for the tokenizer tests.

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
