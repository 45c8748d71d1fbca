"""The tokenizer and chat template of a GGUF file, built to tokenize exactly as llama.cpp does.

`meta` is the file's metadata as plain Python values (`{key: field.contents()}` of
`gguf.GGUFReader`). The rules, all from llama.cpp's src/llama-vocab.cpp (`llama_vocab::impl::load`,
`tokenize`, the SPM and BPE sessions):

    tokenizer.ggml.model "gpt2"   byte-level BPE over tokens + merges (merge rank = list position),
                                  split first by the regexes of `tokenizer.ggml.pre`
                                  (mlctrio.runtime.gguf_pretokenizers); Llama-3-style pre-types
                                  ignore merges for a pre-token that is itself in the vocab.
    tokenizer.ggml.model "llama"  SentencePiece BPE: " " -> "▁", a "▁" prefix on every text run
                                  (`add_space_prefix`, default true; llama.cpp adds it at the start
                                  and after every special token), pairs merged best score first,
                                  unknown characters as <0xNN> byte tokens. Built as an HF BPE whose
                                  merges are derived from the scores (transformers' GGUF converter).
    token types                   control (3) and unknown (2) -> special added tokens, user-defined
                                  (4) -> plain added tokens: both matched literally in the text
                                  before anything else (llama.cpp's parse_special=true).
    bos / add_bos                 tokenizer.ggml.bos_token_id / add_bos_token; llama.cpp's defaults
                                  (SPM: bos 1, add_bos true; BPE: add_bos only for llama3-style).
    end of generation             eos, eot, eom, FIM pad/repo/file-sep and every token spelled like
                                  llama.cpp's EOG list (<|im_end|>, <|eot_id|>, <|endoftext|>, ...),
                                  eos first: HFTokenizer.eos_token_ids and the template's stop ids.

Chat template: `tokenizer.chat_template` (+ named `tokenizer.chat_template.<name>`) as an
HFChatTemplate with bos/eos strings from the ids; the chatml preset when the file has none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, processors

from mlctrio.engine.stop import EOG_TOKEN_NAMES
from mlctrio.engine.tokens import ChatTemplate
from mlctrio.errors import ModelLoadError
from mlctrio.runtime.chat_template import HFChatTemplate, conv_template_from_config
from mlctrio.runtime.gguf_pretokenizers import (
    PreTokenizerSpec,
    byte_level_pre_tokenizer,
    pre_tokenizer_spec,
)
from mlctrio.runtime.tokenizer import HFTokenizer
from mlctrio.runtime.tokenizer_backends import _HFBackend

logger = logging.getLogger(__name__)

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_SPACE = "\u2581"

# Token texts llama.cpp treats as end of generation (and forces to control type).
EOG_TEXTS = EOG_TOKEN_NAMES  # llama.cpp's end-of-generation token texts (engine/stop.py)
# FIM pad / repo / file-separator tokens, also end of generation in llama.cpp.
_FIM_EOG_TEXTS = (
    ("fim_pad", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    ("fim_rep", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("fim_sep", ("<|file_sep|>",)),
)
_FIM_PRE_SUF_MID = """
    <|fim_prefix|> <fim-prefix> <fim_prefix> <｜fim▁begin｜> <PRE> ▁<PRE> <|code_prefix|>
    <|prefix|> <|fim_suffix|> <fim-suffix> <fim_suffix> <｜fim▁hole｜> <SUF> ▁<SUF>
    <|code_suffix|> <|suffix|> <|fim_middle|> <fim-middle> <fim_middle> <｜fim▁end｜>
    <MID> ▁<MID> <|code_middle|> <|middle|>
    """.split()
_HARMONY_USER_DEFINED = frozenset(["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"])


def _token_id(meta: Mapping[str, Any], key: str, default: int | None, n: int) -> int | None:
    """A special-token id as llama.cpp reads it: the file's if in range, else the default."""
    if default is not None and default >= n:
        default = None
    value = meta.get(f"tokenizer.ggml.{key}")
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < n:
            return value
        logger.warning("GGUF tokenizer.ggml.%s = %d is out of the vocabulary", key, value)
    return default


def _token_types(meta: Mapping[str, Any], tokens: Sequence[str]) -> list[int]:
    """Token types with llama.cpp's text-based fixes: EOG/EOT/FIM-looking tokens become control,
    gpt-oss's channel markers user-defined."""
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]
    if len(types) < len(tokens):
        raise ModelLoadError("GGUF tokenizer.ggml.token_type is shorter than the token list")
    forced = EOG_TEXTS.union(_FIM_PRE_SUF_MID, *(texts for _, texts in _FIM_EOG_TEXTS))
    for i, text in enumerate(tokens):
        if text in forced and types[i] not in (_CONTROL, _UNKNOWN):
            types[i] = _CONTROL
        elif text in _HARMONY_USER_DEFINED:
            types[i] = _USER_DEFINED
    return types


def _eog_ids(meta: Mapping[str, Any], tokens: Sequence[str], eos: int | None) -> tuple[int, ...]:
    """llama.cpp's end-of-generation set, eos first, then ascending ids."""
    n = len(tokens)
    by_text = {text: i for i, text in enumerate(tokens)}
    eog = {i for i, text in enumerate(tokens) if text in EOG_TEXTS}
    for key in ("eot_token_id", "eom_token_id"):
        extra = _token_id(meta, key, None, n)
        if extra is not None:
            eog.add(extra)
    for name, spellings in _FIM_EOG_TEXTS:
        # llama.cpp takes the first match in hash order; the lowest id is the stable choice.
        found = sorted(by_text[t] for t in spellings if t in by_text)
        fim = _token_id(meta, f"{name}_token_id", found[0] if found else None, n)
        if fim is not None:
            eog.add(fim)
    if eos is not None:
        eog.add(eos)
    texts = {tokens[i] for i in eog}
    end = by_text.get("<|end|>")
    if end is not None and (
        {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
    ):
        eog.discard(end)  # harmony / solar-open: <|end|> ends a message, not the generation
    if "</s>" in by_text and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(by_text["</s>"])
    rest = sorted(i for i in eog if i != eos)
    return (eos, *rest) if eos is not None and eos in eog else tuple(rest)


def _add_literal_tokens(tok: tokenizers.Tokenizer, tokens: Sequence[str], types: list[int]) -> None:
    """Control/unknown tokens as special, user-defined as plain added tokens (same ids)."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _UNKNOWN)
    ]
    plain = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def _merge_pairs(merges: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` ("left right", split at the first space after the first char)."""
    pairs: list[tuple[str, str]] = []
    dropped = 0
    for merge in merges:
        pos = merge.find(" ", 1)
        left, right = (merge[:pos], merge[pos + 1 :]) if pos >= 0 else ("", "")
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
        else:
            dropped += 1
    if dropped:
        logger.warning("GGUF tokenizer: %d merges name tokens outside the vocabulary", dropped)
    return pairs


def _bpe_tokenizer(
    meta: Mapping[str, Any], tokens: Sequence[str], spec: PreTokenizerSpec
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merge_pairs(meta.get("tokenizer.ggml.merges") or [], vocab)
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = byte_level_pre_tokenizer(spec.regexes)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges that make HF's rank-ordered BPE replay llama.cpp's score-ordered SPM merging:
    every split of a token into two vocabulary pieces, best score of the result first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(
    meta: Mapping[str, Any], tokens: Sequence[str], unk: int | None
) -> tokenizers.Tokenizer:
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, scores),
        unk_token=tokens[unk] if unk is not None else None,
        byte_fallback=True,
    )
    tok = tokenizers.Tokenizer(bpe)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(_SPM_SPACE)] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPM_SPACE)])
    dec = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*dec, decoders.Strip(" ", 1, 0)] if add_prefix else dec)
    return tok


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    """The HFTokenizer of a GGUF file (model "gpt2" or "llama"), tokenizing as llama.cpp does."""
    model = meta.get("tokenizer.ggml.model")
    tokens = [
        t if t else f"[EMPTY_{i}]" for i, t in enumerate(meta.get("tokenizer.ggml.tokens") or [])
    ]
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens")
    if len(set(tokens)) != len(tokens):
        raise ModelLoadError("GGUF tokenizer.ggml.tokens has duplicate tokens")
    n = len(tokens)
    types = _token_types(meta, tokens)
    if model == "gpt2":
        spec = pre_tokenizer_spec(meta.get("tokenizer.ggml.pre"))
        bos = _token_id(meta, "bos_token_id", 11 if spec.default_bos else None, n)
        eos = _token_id(meta, "eos_token_id", 11, n)
        add_bos_default = spec.add_bos
        tok = _bpe_tokenizer(meta, tokens, spec)
    elif model == "llama":
        bos = _token_id(meta, "bos_token_id", 1, n)
        eos = _token_id(meta, "eos_token_id", 2, n)
        add_bos_default = True
        tok = _spm_tokenizer(meta, tokens, _token_id(meta, "unknown_token_id", 0, n))
    else:
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')"
        )
    _add_literal_tokens(tok, tokens, types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_eos and eos is not None:
        # HFTokenizer adds only a BOS itself; an EOS needs the post-processor.
        pieces = ([(tokens[bos], bos)] if add_bos and bos is not None else []) + [
            (tokens[eos], eos)
        ]
        head = " ".join(t for t, _ in pieces[:-1])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head} $A {tokens[eos]}".strip(), special_tokens=pieces
        )
    tokenizer = HFTokenizer(
        _HFBackend(tok),
        bos_token_id=bos,
        eos_token_ids=_eog_ids(meta, tokens, eos),
        add_bos_token=None if add_eos and eos is not None else add_bos,
    )
    logger.info(
        "GGUF tokenizer: %s/%s, vocab %d, bos %s, eog %s",
        model,
        meta.get("tokenizer.ggml.pre"),
        n,
        bos,
        list(tokenizer.eos_token_ids),
    )
    return tokenizer


def _gguf_templates(meta: Mapping[str, Any]) -> dict[str, str]:
    prefix = "tokenizer.chat_template."
    templates = {
        key.removeprefix(prefix): value
        for key, value in meta.items()
        if key.startswith(prefix) and isinstance(value, str)
    }
    default = meta.get("tokenizer.chat_template")
    if isinstance(default, str):
        templates["default"] = default
    elif templates and "default" not in templates:
        templates["default"] = next(iter(templates.values()))
    return templates


def chat_template_from_gguf(meta: Mapping[str, Any], tokenizer: HFTokenizer) -> ChatTemplate:
    """The file's jinja chat template(s), else the architecture's turn format where the vocabulary
    has its turn tokens (Gemma's `<start_of_turn>`), else the chatml preset (llama.cpp's
    fallback); stops on the EOG set."""
    templates = _gguf_templates(meta)
    if not templates:
        arch = str(meta.get("general.architecture", ""))
        if arch.startswith("gemma") and tokenizer.token_to_id("<start_of_turn>") is not None:
            return conv_template_from_config("gemma3_instruction", tokenizer)
        return conv_template_from_config("chatml", tokenizer)

    def text(token_id: int | None) -> str:
        # As llama.cpp's token_to_piece(special=true): the token's text, byte-decoded.
        return (
            tokenizer.decode([token_id], skip_special_tokens=False) if token_id is not None else ""
        )

    n = tokenizer.vocab_size
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    return HFChatTemplate(
        templates,
        special_tokens={
            "bos_token": text(tokenizer.bos_token_id),
            "eos_token": text(eos),
            "unk_token": text(_token_id(meta, "unknown_token_id", None, n)),
            "pad_token": text(_token_id(meta, "padding_token_id", None, n)),
        },
        stop_token_ids=tuple(tokenizer.eos_token_ids),
    )
