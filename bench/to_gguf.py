"""Write an mlctrio-loadable HF Llama checkpoint as GGUF, for llama.cpp to serve the same weights.

    python bench/to_gguf.py demo://small --outtype q4_0 -o /tmp/small-q4_0.gguf
    python bench/to_gguf.py /path/to/hf-llama --outtype f16 -o model-f16.gguf

Needs the `gguf` package (`pip install gguf`, the library llama.cpp's own converter uses). What
this writes is what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama checkpoint, minus the
torch / transformers dependency:

* architecture `llama` (Mistral too, as llama.cpp does; the context is mlctrio's, i.e. capped to
  Mistral's sliding window), or `qwen2` (q/k/v biases, no Q/K permutation);
* q_proj / k_proj rows permuted the way llama.cpp's RoPE expects: HF rotates the two *halves* of
  each head (rotate_half), ggml's "normal" RoPE rotates *adjacent pairs*, so convert_hf_to_gguf.py
  interleaves the halves of every head (`LlamaModel.permute`) — without it, llama.cpp computes a
  different model from the same numbers;
* the tokenizer as llama.cpp's "gpt2" (byte-level BPE) model: tokens, token types, merges, the
  special ids and `tokenizer.ggml.pre`, the pre-tokenizer name llama.cpp selects its splitting
  regex by (see `pre_tokenizer_name`);
* f32, f16, q8_0 or q4_0 weights. Norms (1-D) stay f32, as in every llama.cpp conversion. q8_0 and
  q4_0 quantize *every* 2-D tensor, the token embedding and the output head included, to match
  mlctrio's q4f32_1, which quantizes those too (llama-quantize's default would make the output
  head Q6_K instead). A tensor whose rows are not a multiple of the 32-weight block falls back to
  f16, like convert_hf_to_gguf.py.

q4_0 vs mlctrio's q4f32_1: both are 4 bits with one scale per 32 consecutive weights of a row, but
not the same numbers: q4_0 stores an f16 scale d = max/-8 (signed max) and decodes (q - 8) * d;
q4f32_1 stores an f32 scale max|w|/7 and decodes (q - 7) * s. Same storage and compute class,
not bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# `python bench/to_gguf.py` puts bench/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlctrio.models import formats
from mlctrio.models.llama_config import LlamaConfig

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # weights per q8_0 / q4_0 block (one scale each)

# tokenizer.json pre-tokenizer regexes -> the `tokenizer.ggml.pre` name llama.cpp maps to the same
# regex (src/llama-vocab.cpp). llama.cpp's converter recognizes tokenizers by hashing the token
# ids of a probe text instead, which needs transformers; the regex is what that hash stands for.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_KNOWN_SPLIT_REGEXES = {
    _GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _gguf() -> Any:
    """The gguf package, with an actionable error when it is missing."""
    try:
        import gguf
    except ImportError:
        raise SystemExit("bench/to_gguf.py needs the gguf package: pip install gguf") from None
    return gguf


# -- tokenizer ---------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer_json: Mapping[str, Any]) -> str:
    """The `tokenizer.ggml.pre` value for a byte-level BPE tokenizer.json.

    A bare `ByteLevel` pre-tokenizer with `use_regex` (what mlctrio's demo tokenizer and GPT-2 use)
    splits with the GPT-2 regex: llama.cpp's "gpt-2" (not "default", which adds three extra
    splitting rules for punctuation and digits). A `Split` + `ByteLevel(use_regex=False)`
    sequence is looked up by its regex.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and "ByteLevel" in kinds:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex in _KNOWN_SPLIT_REGEXES:
            return _KNOWN_SPLIT_REGEXES[regex]
    raise ValueError(
        f"unrecognized pre-tokenizer {kinds}: pass --tokenizer-pre with the llama.cpp name "
        "(see tokenizer_pre in llama.cpp's src/llama-vocab.cpp)"
    )


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if value is not None else None


def add_tokenizer(
    writer: Any, model_dir: Path, vocab_size: int, tokenizer_pre: str | None = None
) -> None:
    """Add the byte-level BPE tokenizer of `model_dir` as llama.cpp's "gpt2" tokenizer model."""
    gguf = _gguf()
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{model_dir} has no tokenizer.json: only byte-level BPE tokenizers are converted "
            "(use llama.cpp's convert_hf_to_gguf.py for SentencePiece models)"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{path}: not a byte-level BPE tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    for token_id, entry in added.items():
        vocab[entry["content"]] = token_id
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"token id {max(by_id)} >= vocab_size {vocab_size}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        # The embedding may have more rows than the tokenizer has tokens (padding): llama.cpp
        # needs one entry per row, as convert_hf_to_gguf.py writes them.
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    # tokenizers < 0.20 saves merges as "a b" strings, newer versions as ["a", "b"] pairs; GGUF
    # wants the strings (byte-level BPE pieces never contain a plain space, so this is unambiguous).
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre or pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    # Special ids, with mlctrio's precedence (runtime/tokenizer.py): tokenizer_config.json's
    # tokens, then generation_config.json / config.json ids.
    def read(name: str) -> dict[str, Any]:
        p = model_dir / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    tok_config, gen_config, config = (
        read("tokenizer_config.json"),
        read("generation_config.json"),
        read("config.json"),
    )

    def special(key: str) -> int | None:
        content = _token_content(tok_config.get(key))
        return vocab.get(content) if content is not None else None

    # A null bos_token (Qwen-style, and the demo) means "never prepend one"; llama.cpp still wants
    # an id, so config.json's is written with add_bos_token = false, as convert_hf_to_gguf.py does.
    bos = special("bos_token")
    if bos is None:
        bos = _first_id(gen_config.get("bos_token_id")) or _first_id(config.get("bos_token_id"))
    eos = special("eos_token")
    if eos is None:
        eos = _first_id(gen_config.get("eos_token_id")) or _first_id(config.get("eos_token_id"))
    pad = special("pad_token")
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        # No explicit flag: a byte-level BPE post-processor (the demo's) adds nothing; a
        # TemplateProcessing one (Llama 3) adds what its single template starts with.
        post = tok.get("post_processor") or {}
        steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        add_bos = any(
            s.get("type") == "TemplateProcessing" and "SpecialToken" in (s.get("single") or [{}])[0]
            for s in steps
        )
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    template = tok_config.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)


# -- weights -----------------------------------------------------------------------------------


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: within each head, interleave the rows of the first and
    second half, so ggml's adjacent-pair RoPE computes what HF's rotate_half RoPE computes."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor, one safetensors shard in memory at a time."""
    for path in formats.safetensors_files(model_dir):
        for name, array in formats.read_safetensors(path).items():
            yield name, np.asarray(array, dtype=np.float32)


def _tensor_type(gguf: Any, name: str, array: np.ndarray, outtype: str) -> Any:
    """The GGML type one tensor is stored in (see the module docstring for the rules)."""
    T = gguf.GGMLQuantizationType
    if array.ndim == 1 or outtype == "f32":
        return T.F32
    if outtype == "f16":
        return T.F16
    if array.shape[-1] % QUANT_BLOCK != 0:
        return T.F16
    return T.Q8_0 if outtype == "q8_0" else T.Q4_0


def convert(
    model: str | Path,
    out: str | Path,
    outtype: str = "f32",
    *,
    tokenizer_pre: str | None = None,
    verbose: bool = True,
) -> Path:
    """Write `model` (a directory, demo://tiny|small or HF://org/name) as a GGUF file at `out`."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: expected one of {OUTTYPES}")
    from mlctrio.runtime.model_loader import resolve_model_dir

    model_dir = resolve_model_dir(str(model))
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cfg = LlamaConfig.from_hf(raw)  # validates, and applies mlctrio's own context rules
    if cfg.rope_scaling is not None:
        # llama3 rope scaling is a `rope_freqs` tensor in GGUF; not needed for the bench models.
        raise NotImplementedError("rope_scaling (llama3) is not converted yet")
    arch = gguf.MODEL_ARCH.QWEN2 if cfg.model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA
    permute = arch == gguf.MODEL_ARCH.LLAMA  # qwen2 uses NEOX RoPE in llama.cpp: HF order as is
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[outtype]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")  # renamed into place: a reader never sees half a file
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.context_window_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(ftype)
    add_tokenizer(writer, model_dir, cfg.vocab_size, tokenizer_pre)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    start = time.monotonic()
    seen: set[str] = set()
    for hf_name, array in _hf_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # some checkpoints carry RoPE's constants; llama.cpp computes its own
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reuses token_embd when there is no `output` tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute_qk(array, cfg.num_attention_heads)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute_qk(array, cfg.num_key_value_heads)
        qtype = _tensor_type(gguf, name, array, outtype)
        data = gguf.quants.quantize(array, qtype)
        # Quantized blocks come back as uint8 rows of bytes: GGUFWriter derives the logical
        # shape from the byte shape and `raw_dtype` (f32/f16 arrays carry their own).
        writer.add_tensor(name, data, raw_dtype=qtype)
        seen.add(hf_name)
        if verbose:
            print(f"  {hf_name:<48} -> {name:<28} {qtype.name:<5} {list(array.shape)}")
    if not seen:
        raise ValueError(f"{model_dir}: no safetensors weights found")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tmp.replace(out)
    if verbose:
        size = out.stat().st_size / 2**20
        print(f"wrote {out} ({outtype}, {size:.1f} MiB) in {time.monotonic() - start:.1f} s")
    return out


def cached_gguf(model: str, outtype: str, cache_dir: Path | None = None) -> Path:
    """The GGUF of `model` in `outtype`, converted once into the mlctrio cache.

    The file name carries the resolved model directory's name (a demo model's includes the hash
    of its generator inputs), so a changed demo model gets a new file.
    """
    from mlctrio.models.demo import default_cache_dir
    from mlctrio.runtime.model_loader import resolve_model_dir

    model_dir = resolve_model_dir(model)
    root = (cache_dir or default_cache_dir()) / "gguf"
    out = root / f"{model_dir.name}-{outtype}.gguf"
    if not out.is_file():
        convert(model, out, outtype, verbose=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "model", help="HF Llama checkpoint directory, demo://tiny|small or HF://org/name"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f32")
    p.add_argument(
        "--tokenizer-pre",
        help="override tokenizer.ggml.pre (default: derived from tokenizer.json's pre-tokenizer)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    convert(
        args.model,
        args.output,
        args.outtype,
        tokenizer_pre=args.tokenizer_pre,
        verbose=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
