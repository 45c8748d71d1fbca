"""tokenizer_from_gguf / chat_template_from_gguf: the real SmolLM2 GGUF, small synthetic
vocabularies for llama.cpp's pre-tokenizer table and token-type rules, and a SentencePiece model
trained here as the reference for the "llama" (SPM) tokenizer.

Expected ids come from independent sources only: the file's own vocabulary (token_to_id of a
spelled-out token), SentencePiece itself, hand-derived splits of tiny vocabularies, and
tests/data/gguf_tokenize_golden.json when it was produced by llama.cpp's llama-tokenize.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import sentencepiece

from mlctrio.errors import ModelLoadError
from mlctrio.runtime.chat_template import ConvTemplate, HFChatTemplate
from mlctrio.runtime.gguf_pretokenizers import _REGEXES, pre_tokenizer_spec
from mlctrio.runtime.gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf
from mlctrio.runtime.tokenizer import HFTokenizer
from tests.spm_training import spm_gguf_meta, train_spm

DATA = Path(__file__).parent.parent / "data"
LLAMA_VOCAB_CPP = Path("/root/.cache/mlctrio/llama.cpp/0.3.36/src/src/llama-vocab.cpp")

TEXTS = [
    "Hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "日本語のテキスト、中文字符 and 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "   leading, trailing and   inner   spaces   ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "numbers 12345 and 3.14159 and ١٢٣",
    "I'm sure they'll say it's fine, we've done what I'd DON'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "mixed ascii 日本 and € signs ünïcödé Ωμέγα",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(smollm2_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2(smollm2_meta: dict[str, Any]) -> HFTokenizer:
    return tokenizer_from_gguf(smollm2_meta)


def _id(tok: HFTokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    assert token_id is not None, token
    return token_id


# -- the real SmolLM2 file -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2: HFTokenizer, text: str) -> None:
    ids = smollm2.encode(text)
    assert smollm2.decode(ids, skip_special_tokens=False) == text
    assert b"".join(smollm2.token_bytes(i) for i in ids) == text.encode()
    detok = smollm2.detokenizer(skip_special_tokens=False)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == text


def test_smollm2_special_tokens_are_single_ids(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    start, end = _id(smollm2, "<|im_start|>"), _id(smollm2, "<|im_end|>")
    assert (start, end) == (1, 2)
    assert ids[0] == start and ids[-1] == end
    assert ids[1:-1] == [_id(smollm2, "user"), _id(smollm2, "Ċ"), _id(smollm2, "hi")]
    assert smollm2.decode(ids) == "user\nhi"  # control tokens skipped
    assert smollm2.special_token_ids >= {0, 1, 2, 4}


def test_smollm2_digits_split_one_by_one(smollm2: HFTokenizer) -> None:
    # smollm's first regex is \p{N}: every digit its own pre-token, whatever the vocab holds.
    assert smollm2.encode("12345") == [_id(smollm2, d) for d in "12345"]
    assert smollm2.encode(" 42") == [_id(smollm2, "Ġ"), _id(smollm2, "4"), _id(smollm2, "2")]


def test_smollm2_words_and_contractions(smollm2: HFTokenizer) -> None:
    assert smollm2.encode("Hello world") == [_id(smollm2, "Hello"), _id(smollm2, "Ġworld")]
    assert smollm2.encode("don't")[-1] == _id(smollm2, "'t")


def test_smollm2_bos_eos_and_eog(smollm2: HFTokenizer) -> None:
    assert smollm2.bos_token_id == 1
    # eos <|im_end|> first; <|endoftext|> by llama.cpp's EOG spellings; <reponame> as FIM repo.
    assert list(smollm2.eos_token_ids) == [2, 0, 4]
    assert smollm2.encode("hi", add_special_tokens=True) == smollm2.encode("hi")  # add_bos false


def test_smollm2_chat_template(smollm2_meta: dict[str, Any], smollm2: HFTokenizer) -> None:
    template = chat_template_from_gguf(smollm2_meta, smollm2)
    assert isinstance(template, HFChatTemplate)
    prompt = template.render([{"role": "user", "content": "hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert list(template.stop_token_ids) == [2, 0, 4]
    assert template.special_tokens["bos_token"] == "<|im_start|>"
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    ids = smollm2.encode(prompt)
    assert ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.skipif(
    not (DATA / "gguf_tokenize_golden.json").is_file(), reason="no llama.cpp golden file"
)
def test_smollm2_matches_llama_cpp_golden(smollm2: HFTokenizer) -> None:
    """Ids, bos, add_bos and the EOG set that llama.cpp's llama_tokenize gave for this file
    (tests/data/make_gguf_tokenize_golden.py)."""
    golden = json.loads((DATA / "gguf_tokenize_golden.json").read_text(encoding="utf-8"))
    assert len(golden["cases"]) > 200
    mismatched = [c["text"] for c in golden["cases"] if smollm2.encode(c["text"]) != c["ids"]]
    assert mismatched == []
    assert smollm2.bos_token_id == golden["bos"]
    assert smollm2.eos_token_ids[0] == golden["eos"]
    assert sorted(smollm2.eos_token_ids) == golden["eog"]
    no_bos = smollm2.encode("x", add_special_tokens=True) == smollm2.encode("x")
    assert no_bos is not golden["add_bos"]


# -- the real Gemma 3 270M file: SentencePiece, 262,144 tokens ------------------------------------


@pytest.fixture(scope="module")
def gemma3_meta(gemma3_gguf: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(gemma3_gguf)
    return {
        k: f.contents()
        for k, f in reader.fields.items()
        if k.startswith("tokenizer.") or k == "general.architecture"
    }


@pytest.mark.slow
def test_gemma3_matches_llama_cpp_golden(gemma3_meta: dict[str, Any]) -> None:
    """Gemma's SentencePiece vocabulary, tokenized as llama.cpp does (223 texts: code, CJK,
    emoji, whitespace runs, Gemma's turn tokens mixed into text; make_gguf_tokenize_golden.py
    --specials), and its turn format when the file has no chat template."""
    tok = tokenizer_from_gguf(gemma3_meta)
    golden = json.loads((DATA / "gguf_tokenize_golden_gemma3.json").read_text(encoding="utf-8"))
    assert len(golden["cases"]) > 200
    mismatched = [c["text"] for c in golden["cases"] if tok.encode(c["text"]) != c["ids"]]
    assert mismatched == []
    assert tok.bos_token_id == golden["bos"] and sorted(tok.eos_token_ids) == golden["eog"]
    assert tok.encode("x", add_special_tokens=True)[0] == golden["bos"]  # add_bos true
    template = chat_template_from_gguf(gemma3_meta, tok)
    assert isinstance(template, ConvTemplate)  # the file has no jinja template
    prompt = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.encode(prompt).count(golden["bos"]) == 1  # the text's <bos> is the only one
    assert set(template.stop_token_ids) >= {tok.token_to_id("<end_of_turn>")}


# -- synthetic byte-level vocabularies: llama.cpp's pre-tokenizer table ----------------------------


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _bpe_meta(pre: str | None, extra: list[str], merges: list[str], **kw: Any) -> dict[str, Any]:
    tokens = ["<|endoftext|>", *_byte_alphabet(), *extra]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
        **kw,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


DIGITS = (["12", "123", "1234"], ["1 2", "12 3", "123 4"])


def _pieces(tok: HFTokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) or "?" for i in tok.encode(text)]


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("gpt-2", ["1234"]),  # ' ?\p{N}+'
        ("llama-bpe", ["123", "4"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4"]),  # \p{N}
        ("smollm", ["1", "2", "3", "4"]),  # \p{N} first
        ("deepseek-llm", ["1234"]),  # \p{N}+
        ("deepseek-coder", ["1", "2", "3", "4"]),
        ("falcon", ["123", "4"]),  # [0-9][0-9][0-9] after ' ?\p{N}+'
        ("default", ["123", "4"]),
    ],
)
def test_digit_rules(pre: str, expected: list[str]) -> None:
    tok = tokenizer_from_gguf(_bpe_meta(pre, *DIGITS))
    assert _pieces(tok, "1234") == expected


def test_letters_and_punctuation_rules() -> None:
    extra = ["ab", "Ġab", "!!", "Ġ!!"]
    merges = ["a b", "Ġ ab", "! !", "Ġ !!"]
    gpt2 = tokenizer_from_gguf(_bpe_meta("gpt-2", extra, merges))
    assert _pieces(gpt2, "ab ab !!") == ["ab", "Ġab", "Ġ!!"]
    # llama3: [^\r\n\p{L}\p{N}]?\p{L}+ takes any one non-letter in front of the word
    llama3 = tokenizer_from_gguf(_bpe_meta("llama-bpe", extra, merges))
    assert _pieces(llama3, "!ab") == ["!", "ab"]  # "!ab" is one pre-token, "!a" no merge
    # default/falcon isolate punctuation runs first: " !!" loses its space to the next split
    falcon = tokenizer_from_gguf(_bpe_meta("falcon", extra, merges))
    assert _pieces(falcon, "ab !!") == ["ab", "Ġ", "!!"]


def test_ignore_merges_for_llama3_style() -> None:
    extra = ["abc"]  # in the vocab but no merge builds it
    assert _pieces(tokenizer_from_gguf(_bpe_meta("gpt-2", extra, [])), "abc") == ["a", "b", "c"]
    assert _pieces(tokenizer_from_gguf(_bpe_meta("llama-bpe", extra, [])), "abc") == ["abc"]


def test_add_bos_defaults() -> None:
    extra = ["<|begin_of_text|>"]
    llama3 = tokenizer_from_gguf(
        _bpe_meta("llama-bpe", extra, [], **{"tokenizer.ggml.bos_token_id": 257})
    )
    assert llama3.encode("a", add_special_tokens=True) == [257, _id(llama3, "a")]
    off = _bpe_meta("llama-bpe", extra, [], **{"tokenizer.ggml.add_bos_token": False})
    assert tokenizer_from_gguf(off).encode("a", add_special_tokens=True) == [_id(llama3, "a")]


def test_unknown_pre_tokenizer_falls_back_to_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_from_gguf(_bpe_meta("no-such-pre", *DIGITS))
    assert "no-such-pre" in caplog.text
    assert _pieces(tok, "1234") == ["123", "4"]
    assert pre_tokenizer_spec(None).regexes == _REGEXES["default"]


def test_unsupported_tokenizers_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="kimi-k2"):
        tokenizer_from_gguf(_bpe_meta("kimi-k2", [], []))
    with pytest.raises(ModelLoadError, match="bert"):
        tokenizer_from_gguf({**_bpe_meta("gpt-2", [], []), "tokenizer.ggml.model": "bert"})


@pytest.mark.parametrize(
    "pre",
    """
    default llama-bpe deepseek-llm deepseek-coder falcon starcoder refact command-r gpt-4o
    tekken phi-2 stablelm2 olmo dbrx smaug-bpe bloom poro-chat chatglm-bpe viking jais codeshell
    exaone minerva-7b qwen2 deepseek-v3 chameleon seed-coder exaone-moe jais-2 youtu smollm
    """.split(),
)
def test_every_table_entry_round_trips(pre: str) -> None:
    tok = tokenizer_from_gguf(_bpe_meta(pre, [], []))
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text, (pre, text)


@pytest.mark.skipif(not LLAMA_VOCAB_CPP.is_file(), reason="llama.cpp source not unpacked")
def test_regex_table_is_llama_cpp_s() -> None:
    """Every regex list equals the C++ string literals in llm_tokenizer_bpe's switch."""
    source = LLAMA_VOCAB_CPP.read_text(encoding="utf-8")
    body = source[source.index("llm_tokenizer_bpe(const llama_vocab & vocab) {") :]
    body = body[: body.index("std::vector<std::string> regex_exprs;")]
    escapes = {"\\": "\\", '"': '"', "r": "\r", "n": "\n", "t": "\t"}
    by_type: dict[str, tuple[str, ...]] = {}
    for block in body.split("break;"):
        found = re.search(r"regex_exprs = \{(.*?)\};", block, re.S)
        if not found:
            continue
        code = "\n".join(
            ln for ln in found.group(1).splitlines() if not ln.strip().startswith("//")
        )
        literals = tuple(
            re.sub(r"\\(.)", lambda m: escapes[m.group(1)], lit)
            for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', code)
        )
        cases = re.findall(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):", block) or ["DEFAULT"]
        by_type.update(dict.fromkeys(cases, literals))
    load = source[source.index("void llama_vocab::impl::load") :]
    pattern = (
        r'((?:tokenizer_pre == "[^"]+"\s*(?:\|\|)?\s*)+)\)\s*\{\s*'
        r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);"
    )
    checked = 0
    for names, pre_type in re.findall(pattern, load):
        for name in re.findall(r'"([^"]+)"', names):
            try:
                spec = pre_tokenizer_spec(name)
            except ModelLoadError:
                continue  # refused: needs llama.cpp's custom code
            assert spec.regexes == by_type[pre_type], name
            checked += 1
    assert checked > 70


# -- token types and the end-of-generation set -----------------------------------------------------


def test_token_types_and_eog() -> None:
    extra = ["<|eot_id|>", "<tool>", "<|return|>", "<|call|>", "<|end|>", "<unused0>"]
    meta = _bpe_meta("gpt-2", extra, [])
    types = meta["tokenizer.ggml.token_type"]
    n = len(types)
    types[n - 6] = 1  # <|eot_id|> typed normal: llama.cpp forces it to control and EOG
    types[n - 5] = 4  # <tool>: user-defined
    types[n - 4 :] = [3, 3, 3, 5]
    tok = tokenizer_from_gguf(meta)
    eot, tool, ret, call, end = (_id(tok, t) for t in extra[:5])
    # eos first; <|end|> is dropped when <|return|> and <|call|> are there (gpt-oss harmony)
    assert list(tok.eos_token_ids) == [0, eot, ret, call]
    assert tok.encode("a<|eot_id|>b<tool>c<|end|>") == [
        _id(tok, "a"),
        eot,
        _id(tok, "b"),
        tool,
        _id(tok, "c"),
        end,
    ]
    assert tok.decode(tok.encode("a<tool>b<|eot_id|>")) == "a<tool>b"  # user-defined kept
    assert len(tok.encode("<unused0>")) > 1  # unused: not matched literally


# -- SentencePiece ("llama") vocabularies ----------------------------------------------------------


@pytest.fixture(scope="module")
def spm_model() -> sentencepiece.SentencePieceProcessor:
    proto = train_spm(
        topics=60,
        vocab_size=800,
        user_defined_symbols=["<tool>"],
        add_dummy_prefix=True,
        split_digits=False,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=proto)


def _spm_meta(sp: sentencepiece.SentencePieceProcessor) -> dict[str, Any]:
    return spm_gguf_meta(sp)


SPM_TEXTS = [t for t in TEXTS if "<|" not in t and t] + [
    "The quick brown fox jumps over the lazy dog.",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  two  spaces",
    "Return the value of the expression; for example, x.y(z) raises an error.",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_matches_sentencepiece(
    spm_model: sentencepiece.SentencePieceProcessor, text: str
) -> None:
    tok = tokenizer_from_gguf(_spm_meta(spm_model))
    ids = tok.encode(text)
    assert ids == list(spm_model.encode(text))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [1, *ids]


def test_spm_specials_bos_and_space_prefix(spm_model: sentencepiece.SentencePieceProcessor) -> None:
    meta = _spm_meta(spm_model)
    tok = tokenizer_from_gguf(meta)
    assert tok.bos_token_id == 1 and list(tok.eos_token_ids) == [2]  # </s> is eos and EOG
    # llama.cpp prefixes a space to every text run that follows a special token
    ids = tok.encode("</s>Hello<tool>world")
    assert ids == [2, *spm_model.encode("Hello"), _id(tok, "<tool>"), *spm_model.encode("world")]
    no_prefix = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_space_prefix": False})
    ids = no_prefix.encode("Hello world")
    assert not (no_prefix.id_to_token(ids[0]) or "").startswith("\u2581")
    assert no_prefix.decode(ids) == "Hello world"


# -- chat template ---------------------------------------------------------------------------------


def test_named_templates_and_chatml_fallback() -> None:
    meta = _bpe_meta("gpt-2", ["<|im_start|>", "<|im_end|>"], [])
    tok = tokenizer_from_gguf(meta)
    plain = chat_template_from_gguf(meta, tok)
    assert isinstance(plain, ConvTemplate)
    assert set(tok.eos_token_ids) <= set(plain.stop_token_ids)
    named = {
        **meta,
        "tokenizer.chat_template": "D{{ messages[0]['content'] }}",
        "tokenizer.chat_template.tool_use": "T{{ tools | length }}",
    }
    template = chat_template_from_gguf(named, tok)
    assert template.render([{"role": "user", "content": "x"}]) == "Dx"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert template.render([{"role": "user", "content": "x"}], tools=tools) == "T1"


@pytest.mark.skipif(
    not (DATA / "spm_tokenize_golden.json").is_file(), reason="no llama.cpp SPM golden file"
)
def test_spm_matches_llama_cpp_golden() -> None:
    """tests/data/spm_tiny.gguf (a SentencePiece vocab with a user-defined <tool>): the ids
    llama.cpp gave (tests/data/make_spm_gguf_golden.py), specials and space prefixes included."""
    reader = gguf.GGUFReader(DATA / "spm_tiny.gguf")
    tok = tokenizer_from_gguf({k: f.contents() for k, f in reader.fields.items()})
    golden = json.loads((DATA / "spm_tokenize_golden.json").read_text(encoding="utf-8"))
    assert len(golden["cases"]) > 300
    mismatched = [c["text"] for c in golden["cases"] if tok.encode(c["text"]) != c["ids"]]
    assert mismatched == []
    assert [tok.bos_token_id] == golden["bos"] and list(tok.eos_token_ids) == golden["eog"]
