"""llama.cpp's BPE pre-tokenizer table (`tokenizer.ggml.pre` -> split regexes) for HF `tokenizers`.

A GGUF file names its pre-tokenizer; llama.cpp (src/llama-vocab.cpp, `llama_vocab::impl::load`
and the `llm_tokenizer_bpe` constructor) maps the name to a pre-type and the pre-type to a list of
regexes applied one after another: each regex splits every piece so far into matches and the text
between them (HF's `Split(..., behavior="isolated")`). The strings below are llama.cpp's own
(its "adapted" forms, e.g. `(?:'[sS]|...)` for `(?i:'s|...)`), so that HF's Oniguruma engine
sees what llama.cpp's std::regex sees. Two translations keep the semantics of llama.cpp's regex
engine:

    \\p{Lu} \\p{Ll} \\p{Lt} \\p{Lm} \\p{Lo}  -> \\p{L}   (llama.cpp collapses every letter category
                                                    into one "letter" class)
    $ at the end                       -> \\z      (std::regex ECMAScript `$` is end of input;
                                                    Oniguruma's is end of line)

llama.cpp runs the GPT-2 and Llama-3 regexes through hand-written matchers equivalent to the
regexes (the GPT-2 one with the implicit trailing `|\\s+`, which an isolated split reproduces).
Pre-types that need llama.cpp's custom code (kimi-k2, afmoe, tiny_aya, superbpe) or that skip
GPT-2 byte encoding (gemma4, sarvam-moe, whitespace) are refused with a ModelLoadError. A missing
or unknown name falls back to the "default" regexes with a logged warning (llama.cpp of this
vintage refuses an unknown name; older versions fell back the same way).
"""

from __future__ import annotations

import logging
import re

import attrs
from tokenizers import Regex, pre_tokenizers

from mlctrio.errors import ModelLoadError

logger = logging.getLogger(__name__)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_CJK_KANA = "[一-龥\u3040-ゟ゠-ヿ]+"
# As llama.cpp spells it: a C-style literal with real CR/LF characters.
_DEEPSEEK3_PUNCT = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
)
_DEEPSEEK3 = _DEEPSEEK3_PUNCT + "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
_DEEPSEEK_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-"
    "ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-"
    "\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ"
    "-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)
_CJK_HANGUL = "[一-龥ࠀ-一가-\ud7ff]+"
_UPPER_LOWER = r"((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_UPPER_LOWER_2 = r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

# llama.cpp's pre-type -> regexes (the `llm_tokenizer_bpe` constructor's switch).
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "jais2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|"
        + "|".join(rf"\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
        + r"|\s{1,2}(?!\S)|\s{1}",
    ),
    "deepseek-llm": (
        "[\r\n]",
        rf"\s?[{_DEEPSEEK_LETTERS}]+",
        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        r"\s+$",
        _CJK_HANGUL,
        r"\p{N}+",
    ),
    "deepseek3": (r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3),
    "spark2_5": (
        r"\p{N}{1,3}",
        _CJK_KANA,
        _DEEPSEEK3_PUNCT + "| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
        r"\p{N}",
    ),
    "youtu": (
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|" + _CJK_KANA,
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "qwen2": (_QWEN2,),
    "qwen35": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER_2}"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "gpt4o": (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER}{_CONTRACTIONS}?"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_LOWER_2}{_CONTRACTIONS}?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (_QWEN2.removeprefix(_CONTRACTIONS + "|"),),
    "laguna": (r"[^\n]+|[\n]+", _QWEN2),
    "exaone-moe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (r"\p{N}{1,3}", _QWEN2.replace(r"|\p{N}|", r"|\p{N}+|")),
}

# `tokenizer.ggml.pre` -> pre-type, for names that are not a pre-type themselves.
_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        """
    llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx
    smaug-bpe chatglm-bpe glm4 glm5
    """.split(),
        "llama3",
    ),
    "jais-2": "jais2",
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"], "deepseek3"),
    **dict.fromkeys(
        ["refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
        "starcoder",
    ),
    **dict.fromkeys(
        """
    gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum
    modern-bert jina-v1-en jina-v2-code roberta-bpe exaone4 mpt olmo jais trillion
    granite-docling
    """.split(),
        "gpt2",
    ),
    **dict.fromkeys(
        """
    stablelm2 deepseek-r1-qwen kormo f2llmv2 megrez hunyuan solar-open grok-2
    """.split(),
        "qwen2",
    ),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], "poro"),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], "gpt4o"),
    **dict.fromkeys(["bailingmoe2", "llada-moe"], "bailingmoe"),
}
_IGNORE_MERGES = frozenset(
    """
    minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2
    jina-v5-nano youtu glm4 glm5 tekken
    """.split()
)
_ADD_BOS = frozenset(
    """
    llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
    tekken chameleon
    """.split()
)
_NO_BOS = frozenset(["chatglm-bpe", "glm4", "glm5"])  # llama.cpp clears the default BOS id
_UNSUPPORTED = frozenset(
    """
    kimi-k2 afmoe tiny_aya cohere2moe superbpe gemma4 sarvam-moe whitespace
    granite-embed-multi-311m granite-embed-multi-97m
    """.split()
)


@attrs.frozen
class PreTokenizerSpec:
    """What llama.cpp derives from `tokenizer.ggml.pre` for a "gpt2" (byte-level BPE) vocab."""

    name: str
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocab is one token, unmerged
    add_bos: bool = False  # the default of tokenizer.ggml.add_bos_token
    default_bos: bool = True  # False: no BOS id unless the file names one


def pre_tokenizer_spec(name: str | None) -> PreTokenizerSpec:
    """llama.cpp's reading of `tokenizer.ggml.pre`: regexes and the flags that come with it."""
    if name in _UNSUPPORTED:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {name!r} needs llama.cpp's custom splitting code; not supported"
        )
    pre = name if name in _REGEXES else _ALIASES.get(name or "")
    if pre is None:
        logger.warning(
            "GGUF pre-tokenizer %r is %s: using llama.cpp's 'default' regexes; "
            "tokenization may differ from the model's",
            name,
            "missing" if not name else "unknown",
        )
        pre = "default"
    return PreTokenizerSpec(
        name=pre,
        regexes=_REGEXES[pre],
        ignore_merges=name in _IGNORE_MERGES,
        add_bos=name in _ADD_BOS,
        default_bos=name not in _NO_BOS,
    )


_LETTER_CATEGORY = re.compile(r"\\p\{L[ultmo]\}")


def onig_regex(regex: str) -> str:
    """A llama.cpp split regex rewritten so Oniguruma matches what llama.cpp's engine matches."""
    regex = _LETTER_CATEGORY.sub(r"\\p{L}", regex)
    if regex.endswith("$") and not regex.endswith("\\$"):
        regex = regex[:-1] + r"\z"
    return regex


def byte_level_pre_tokenizer(regexes: tuple[str, ...]) -> pre_tokenizers.PreTokenizer:
    """The regex splits, in order, then GPT-2's byte-to-unicode mapping (no regex of its own)."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(onig_regex(r)), behavior="isolated") for r in regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)
