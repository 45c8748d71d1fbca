"""Deterministic demo Llama checkpoints in HF format, made offline in seconds.

    write_demo_model(out_dir, preset="tiny"|"small", seed=0)   writes one, every byte a function
                                                               of (preset, seed, GENERATOR_VERSION)
    ensure_demo_model(preset) -> Path                          writes it once into a cache dir

The cached copy follows cache_files.py: written into a temporary folder with its manifest
(MANIFEST: size + sha256 of every file) and renamed into place; checked against the manifest on
every use; rebuilt (one log line) when anything is missing, truncated or altered; built under a
flock so two processes starting together write it once.

The tokenizer is a byte-level BPE trained with `tokenizers` on the text of the stdlib's
`pydoc_data.topics` (always there, no download), with ChatML's special tokens; the chat template
is ChatML with tools, Qwen2.5-style. The weights are random (std 0.02), so the model babbles:
it exists to exercise loading, compiling and serving, not to say anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import numpy as np

from mlctrio.config import cache_root
from mlctrio.errors import ConfigError
from mlctrio.models.cache_files import (
    check_record,
    file_record,
    locked,
    report_corrupt,
    write_atomic,
)
from mlctrio.models.formats import write_safetensors, write_safetensors_sharded

logger = logging.getLogger(__name__)

# Bump when anything below changes the files written, so cached demo models are regenerated.
GENERATOR_VERSION = "1"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MANIFEST = ".manifest.json"  # {file name: {"size", "sha256"}}, written last


@attrs.frozen
class DemoPreset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_window_size: int
    dtype: str  # "float32" or "bfloat16" (the bf16 path of real checkpoints)
    max_shard_bytes: int | None  # None: one model.safetensors


PRESETS: Mapping[str, DemoPreset] = MappingProxyType(
    {
        "tiny": DemoPreset(1000, 64, 176, 2, 4, 2, 2048, "float32", None),
        "small": DemoPreset(8000, 768, 2048, 12, 12, 4, 4096, "bfloat16", 128 << 20),
    }
)

CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role in ['system', 'developer'] %}
{{- messages[0].content + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role in ['system', 'developer'] %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role in ['system', 'developer'] %}
{%- if not loop.first %}
{{- raise_exception('System messages must come first.') }}
{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}
{{- '\\n' + message.content }}
{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}
{{- fn.arguments }}
{%- else %}
{{- fn.arguments | tojson }}
{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or loop.previtem.role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- else %}
{{- raise_exception('Unknown message role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_demo_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"trained {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def _weight_shapes(p: DemoPreset) -> dict[str, tuple[int, ...]]:
    head_dim = p.hidden_size // p.num_heads
    h, kv = p.hidden_size, p.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (p.vocab_size, h)}
    for i in range(p.num_layers):
        pre = f"model.layers.{i}"
        shapes |= {
            f"{pre}.input_layernorm.weight": (h,),
            f"{pre}.self_attn.q_proj.weight": (h, h),
            f"{pre}.self_attn.k_proj.weight": (kv, h),
            f"{pre}.self_attn.v_proj.weight": (kv, h),
            f"{pre}.self_attn.o_proj.weight": (h, h),
            f"{pre}.post_attention_layernorm.weight": (h,),
            f"{pre}.mlp.gate_proj.weight": (p.intermediate_size, h),
            f"{pre}.mlp.up_proj.weight": (p.intermediate_size, h),
            f"{pre}.mlp.down_proj.weight": (h, p.intermediate_size),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (p.vocab_size, h)}
    return shapes


def demo_weights(preset: DemoPreset, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights, std 0.02 (norms: ones). Each tensor has its own stream, keyed by
    (seed, index), so one tensor's values do not depend on another's shape."""
    out = {}
    for index, (name, shape) in enumerate(_weight_shapes(preset).items()):
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            rng = np.random.default_rng([seed, index])
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return out


def _configs(p: DemoPreset, tok: Any) -> dict[str, dict[str, Any]]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos, bos = ids["<|im_end|>"], ids["<|endoftext|>"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": p.context_window_size,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": p.dtype,
    }
    generation = {"bos_token_id": bos, "eos_token_id": [eos, bos], "do_sample": False}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for t, i in ids.items()
    }  # fmt: skip
    tok_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": p.context_window_size,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tok_config,
    }


def _preset(preset: str) -> DemoPreset:
    if preset not in PRESETS:
        raise ConfigError(f"unknown demo preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset]


def write_demo_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a demo Llama checkpoint (HF layout) into `out_dir`, which is created."""
    p = _preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer(p.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    for name, data in _configs(p, tok).items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    weights = demo_weights(p, seed)
    dtypes = dict.fromkeys(weights, "BF16") if p.dtype == "bfloat16" else None
    if p.max_shard_bytes is None:
        write_safetensors(out / "model.safetensors", weights, dtypes=dtypes)
    else:
        # Shard sizes count float32 bytes; bf16 shards come out half that.
        write_safetensors_sharded(out, weights, max_shard_bytes=p.max_shard_bytes, dtypes=dtypes)
    logger.info("wrote demo model %s (seed %d) to %s", preset, seed, out)
    return out


def demo_cache_key(preset: str, seed: int = 0) -> str:
    spec = json.dumps([GENERATOR_VERSION, attrs.asdict(_preset(preset)), seed], sort_keys=True)
    return f"{preset}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def default_cache_dir() -> Path:
    """The cache root ($MLCTRIO_CACHE_DIR or ~/.cache/mlctrio); demo models go under demo/."""
    return cache_root()


def ensure_demo_model(
    preset: str = "tiny", *, seed: int = 0, cache_dir: str | Path | None = None
) -> Path:
    """The demo model's directory in `<cache_dir>/demo/<preset>-<hash>`, written on first use
    (into a temporary directory renamed into place, so a reader never sees half a model) and
    rewritten when it no longer matches its manifest."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "demo"
    final = root / demo_cache_key(preset, seed)
    if final.exists() and manifest_problem(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{final.name}.lock"):
        if final.exists():
            problem = manifest_problem(final)
            if problem is None:  # written by another process while this one waited
                return final
            report_corrupt(logger, final, problem)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=root))
        try:
            write_demo_model(tmp, preset, seed)
            records = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            write_atomic(tmp / MANIFEST, json.dumps(records, indent=1).encode())
            if final.exists():  # the bad copy moves aside (a rename), then is removed
                final.rename(trash / final.name)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def manifest_problem(folder: Path) -> str | None:
    """None when every file of `folder`'s manifest matches it (and the manifest is readable)."""
    try:
        records = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        items = list(records.items())
    except (OSError, ValueError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable: {type(exc).__name__}: {exc}"
    if "config.json" not in records:
        return f"{MANIFEST} lists no config.json"
    for name, record in items:
        problem = check_record(folder / name, record)
        if problem is not None:
            return problem
    return None
