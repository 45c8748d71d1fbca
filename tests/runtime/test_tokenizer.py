"""HFTokenizer, load_tokenizer and the incremental detokenizer.

Two real `tokenizers` models are built here, offline: a byte-level BPE (GPT-2 style, trained on
the stdlib's pydoc text) and a SentencePiece-style BPE with byte fallback (Llama-2 style:
▁ for spaces, <0xNN> byte tokens, a decoder that strips the first space).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from mlctrio.errors import ModelLoadError
from mlctrio.runtime.tokenizer import (
    HFTokenizer,
    SentencePieceBackend,
    WindowDetokenizer,
    load_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = [
    "Hello world",
    "日本語のテキスト、中文字符",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "mixed ascii 日本 and € signs",
]


def _byte_level_tokenizer() -> Tokenizer:
    from pydoc_data.topics import topics

    from tokenizers import pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:20], trainer)
    return tok


def _spm_style_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "He", "ll", "▁He", "llo", "▁Hello"]
    pieces += ["▁w", "▁wo", "or", "▁wor", "ld", "▁world", "日", "本", "語"]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "H"), ("H", "e"), ("l", "l"), ("▁H", "e"), ("ll", "o"), ("▁He", "llo")]
    merges += [("▁", "w"), ("▁w", "o"), ("o", "r"), ("▁wo", "r"), ("l", "d"), ("▁wor", "ld")]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("byte_level")
    _byte_level_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return d


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spm_style")
    _spm_style_tokenizer().save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return d


@pytest.fixture(scope="module")
def byte_level(byte_level_dir: Path) -> HFTokenizer:
    return load_tokenizer(byte_level_dir)


@pytest.fixture(scope="module")
def spm(spm_dir: Path) -> HFTokenizer:
    return load_tokenizer(spm_dir)


def stream(tok: HFTokenizer, ids: Sequence[int], skip: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    return [detok.push(i) for i in ids] + [detok.flush()]


def piece_id(tok: HFTokenizer, piece: str) -> int:
    token_id = tok.token_to_id(piece)
    assert token_id is not None, piece
    return token_id


def byte_id(tok: HFTokenizer, b: int) -> int:
    return piece_id(tok, f"<0x{b:02X}>")


# -- loading and plain encode/decode ---------------------------------------------------------------


def test_load_reads_bos_and_eos_lists(byte_level: HFTokenizer, spm: HFTokenizer) -> None:
    im_end = byte_level.token_to_id("<|im_end|>")
    assert im_end == 2
    # generation_config's list first, tokenizer_config's eos merged in, no duplicates
    assert list(byte_level.eos_token_ids) == [2, 0]
    assert byte_level.bos_token_id is None
    assert spm.bos_token_id == 1
    assert list(spm.eos_token_ids) == [2]
    assert byte_level.special_token_ids == {0, 1, 2}


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(byte_level: HFTokenizer, spm: HFTokenizer, text: str) -> None:
    assert byte_level.decode(byte_level.encode(text)) == text
    # the SentencePiece-style normalizer adds a leading ▁ that the decoder strips again
    assert spm.decode(spm.encode(text)) == text


def test_special_tokens_in_text_are_single_tokens(byte_level: HFTokenizer) -> None:
    ids = byte_level.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert byte_level.decode(ids) == "user\nhi"
    assert byte_level.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_bos_added_once(spm: HFTokenizer) -> None:
    ids = spm.encode("Hello", add_special_tokens=True)
    assert ids[0] == 1 and ids[1] != 1
    # a prompt that already starts with the BOS text (a chat template's {{ bos_token }})
    doubled = spm.encode("<s>Hello", add_special_tokens=True)
    assert doubled.count(1) == 1 and doubled[0] == 1
    assert spm.encode("Hello") == ids[1:]


def test_add_bos_token_from_config(spm_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((spm_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello", add_special_tokens=True) == tok.encode("Hello")


def test_vocab_and_merges_fallback(tmp_path: Path, byte_level: HFTokenizer) -> None:
    original = _byte_level_tokenizer()
    original.model.save(str(tmp_path))  # vocab.json + merges.txt
    added = {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIALS)}
    config = {"added_tokens_decoder": added, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    text = "<|im_start|>assistant\n日本 😀 def f(x): return x<|im_end|>"
    assert tok.encode(text) == byte_level.encode(text)
    assert tok.eos_token_ids == (2,)
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_sentencepiece_model_without_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails even if installed
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not really a model")
    with pytest.raises(ModelLoadError, match="sentencepiece"):
        load_tokenizer(tmp_path)


def test_no_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_tokenizer(tmp_path)


# -- token_bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_concatenate_to_text(
    byte_level: HFTokenizer, spm: HFTokenizer, text: str
) -> None:
    ids = byte_level.encode(text)
    assert b"".join(byte_level.token_bytes(i) for i in ids) == text.encode()
    # SentencePiece tokens carry their word-boundary space: the prepended ▁ shows up
    ids = spm.encode(text)
    assert b"".join(spm.token_bytes(i) for i in ids) == (" " + text).encode()


def test_token_bytes_of_single_tokens(byte_level: HFTokenizer, spm: HFTokenizer) -> None:
    assert spm.token_bytes(byte_id(spm, 0xE2)) == b"\xe2"
    assert spm.token_bytes(spm.token_to_id("▁Hello") or -1) == b" Hello"
    assert spm.token_bytes(1) == b"<s>"
    assert byte_level.token_bytes(2) == b"<|im_end|>"
    # "Ġ" is GPT-2's spelling of the space byte; a lone continuation byte is just that byte
    assert byte_level.token_bytes(byte_level.token_to_id("Ġ") or -1) == b" "
    assert byte_level.token_bytes(byte_level.token_to_id("\u0100") or -1) == b"\x00"
    with pytest.raises(ValueError):
        byte_level.token_bytes(10**6)


# -- streaming detokenization ------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode(
    byte_level: HFTokenizer, spm: HFTokenizer, text: str, skip: bool
) -> None:
    for tok in (byte_level, spm):
        ids = tok.encode(text, add_special_tokens=True)
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_cjk_held_until_complete_then_emitted(byte_level: HFTokenizer) -> None:
    ids = byte_level.encode("日本")
    assert len(ids) > 2  # split into byte tokens by this small vocabulary
    pieces = stream(byte_level, ids)
    assert pieces[-1] == ""  # nothing was left for flush
    assert [p for p in pieces if p] == ["日", "本"]


def test_emoji_bytes_streamed(spm: HFTokenizer) -> None:
    ids = [spm.token_to_id("▁Hello")] + [byte_id(spm, b) for b in "😀".encode()]
    ids += [spm.token_to_id("▁world")]
    pieces = stream(spm, [i for i in ids if i is not None])
    assert pieces[0] == "Hello"
    assert pieces[1:4] == ["", "", ""]  # the emoji's bytes are held back ...
    assert pieces[5] == "😀 world"  # ... until a non-byte token closes the run
    assert "".join(pieces) == "Hello😀 world"


def test_byte_fallback_run_made_invalid_later(spm: HFTokenizer) -> None:
    # "€" followed by a stray continuation byte: tokenizers' ByteFallback turns the whole run into
    # U+FFFDs, so emitting "€" early would disagree with decode().
    ids = [byte_id(spm, b) for b in b"\xe2\x82\xac\x80"] + [spm.token_to_id("▁Hello") or -1]
    assert "".join(stream(spm, ids)) == spm.decode(ids) == "\ufffd" * 4 + " Hello"


def test_spaces_after_special_tokens(spm: HFTokenizer) -> None:
    hello, world = piece_id(spm, "▁Hello"), piece_id(spm, "▁world")
    ids = [1, hello, 2, world, 2, 2, world]
    for skip, expected in (
        (True, "Hello world world"),
        (False, "<s> Hello</s> world</s></s> world"),
    ):
        assert spm.decode(ids, skip_special_tokens=skip) == expected
        assert "".join(stream(spm, ids, skip)) == expected


def test_leading_lone_space_token(spm: HFTokenizer) -> None:
    space, hello = piece_id(spm, "▁"), piece_id(spm, "▁Hello")
    ids = [hello, space, space, hello]
    assert "".join(stream(spm, ids)) == spm.decode(ids) == "Hello   Hello"


def test_special_tokens_shown_when_not_skipped(byte_level: HFTokenizer) -> None:
    ids = byte_level.encode("<|im_start|>assistant\nok<|im_end|>")
    assert stream(byte_level, ids, skip=False)[0] == "<|im_start|>"
    assert stream(byte_level, ids, skip=True)[0] == ""


def test_window_stays_bounded_on_invalid_bytes(byte_level: HFTokenizer) -> None:
    # A stream of stray continuation bytes never forms a character; the window must still be cut.
    stray = byte_level.token_to_id("\u00a1")  # GPT-2 spells byte 0xA1 as "¡"
    assert stray is not None and byte_level.token_bytes(stray) == b"\xa1"
    seen: list[int] = []

    def decode(ids: Sequence[int]) -> str:
        seen.append(len(ids))
        return byte_level.decode(ids)

    detok = WindowDetokenizer(decode)
    ids = [stray] * 300
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == byte_level.decode(ids) == "\ufffd" * 300
    assert max(seen) <= 40


# -- properties ----------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_text, skip=st.booleans())
def test_property_stream_of_encoded_text(
    byte_level: HFTokenizer, spm: HFTokenizer, text: str, skip: bool
) -> None:
    for tok in (byte_level, spm):
        ids = tok.encode(text, add_special_tokens=True)
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), skip=st.booleans())
def test_property_stream_of_any_ids(
    byte_level: HFTokenizer, spm: HFTokenizer, data: st.DataObject, skip: bool
) -> None:
    # Models emit any id sequence, not only what encode() produces: mix in specials, byte
    # tokens and lone continuation bytes, which stress the hold-back and the window cut.
    for tok in (byte_level, spm):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=60))
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


# -- SentencePiece backend, with a stand-in for sentencepiece.SentencePieceProcessor ------------


class FakeProcessor:
    """The slice of SentencePieceProcessor's API the backend uses; greedy longest-match encode."""

    def __init__(self) -> None:
        self.pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
        self.pieces += ["▁", "▁Hello", "▁world", "日", "o"]

    def get_piece_size(self) -> int:
        return len(self.pieces)

    def is_control(self, i: int) -> bool:
        return i in (1, 2)

    def is_unknown(self, i: int) -> bool:
        return i == 0

    def bos_id(self) -> int:
        return 1

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]

    def piece_to_id(self, piece: str) -> int:
        return self.pieces.index(piece) if piece in self.pieces else 0

    def encode(self, text: str) -> list[int]:
        rest, ids = "▁" + text.replace(" ", "▁"), []
        while rest:
            match = max((p for p in self.pieces[259:] if rest.startswith(p)), key=len, default="")
            if match:
                ids.append(self.pieces.index(match))
                rest = rest[len(match) :]
            else:
                ids += [3 + b for b in rest[0].encode()]
                rest = rest[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        data = b"".join(
            bytes([i - 3]) if 3 <= i < 259 else self.pieces[i].replace("▁", " ").encode()
            for i in ids
            if not self.is_control(i)
        )
        return data.decode(errors="replace").removeprefix(" ")


def test_sentencepiece_backend() -> None:
    tok = HFTokenizer(SentencePieceBackend(FakeProcessor()), bos_token_id=1, eos_token_ids=(2,))
    ids = tok.encode("Hello world 日€", add_special_tokens=True)
    assert ids[:3] == [1, 260, 261]
    assert tok.decode(ids) == "Hello world 日€"
    assert tok.decode([*ids, 2], skip_special_tokens=False) == "<s>Hello world 日€</s>"
    assert tok.token_bytes(3 + 0xE2) == b"\xe2" and tok.token_bytes(260) == b" Hello"
    assert tok.token_to_id("▁world") == 261 and tok.token_to_id("nope") is None
    assert "".join(stream(tok, ids)) == tok.decode(ids)
