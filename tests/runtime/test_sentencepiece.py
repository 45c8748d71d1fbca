"""A real SentencePiece `tokenizer.model` (trained here, offline) through `load_tokenizer`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlctrio.runtime.tokenizer import load_tokenizer
from tests.spm_training import train_spm


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spm")
    # Llama's tokenizer.model: no dummy prefix (the tests add the space themselves).
    proto = train_spm(topics=80, vocab_size=600, add_dummy_prefix=False)
    (root / "tokenizer.model").write_bytes(proto)
    (root / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return root


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, the quick brown fox.",
        "日本語のテキスト",
        "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🎉🎊",
        "  two  spaces",
    ],
)
def test_round_trip_and_streaming(spm_dir: Path, text: str) -> None:
    tok = load_tokenizer(spm_dir)
    assert tok.bos_token_id == 1 and list(tok.eos_token_ids) == [2]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos[0] == 1 and with_bos[1:] == ids
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never a broken character on the way
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text


def test_byte_fallback_tokens_are_used(spm_dir: Path) -> None:
    tok = load_tokenizer(spm_dir)
    ids = tok.encode("𝔘")  # not in a 600-piece vocabulary: byte-fallback tokens
    assert len(ids) >= 4
    assert b"".join(tok.token_bytes(i) for i in ids) == "𝔘".encode()
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "𝔘" and all(p in ("", "𝔘") for p in pieces)
