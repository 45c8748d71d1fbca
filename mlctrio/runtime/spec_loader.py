"""Build the `Speculator` a served model's engine drafts with (`--speculative-mode`).

ngram needs nothing but the mode. medusa and eagle read heads trained for the served model
(runtime/spec_heads.py: shipped ones, or a directory as the first `--additional-models` entry)
over the served model's own runner, which records its hidden states. small_draft has the draft
model (the first `--additional-models` entry) loaded the way the served model is
(model_loader.load_draft), into its own runner and KV cache, and checks that it speaks the same
vocabulary: the draft proposes token ids the target then verifies, so both must mean the same
thing by every id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineConfig, ServerConfig
from ..errors import ConfigError
from .draft_head import DraftHead
from .draft_model import DraftModelProposer
from .eagle import EagleLayer, EagleProposer
from .medusa import MedusaHeads, MedusaProposer
from .spec_heads import check_shapes, check_target, find_shipped, read_heads
from .spec_policy import DraftPolicy
from .speculative import NgramDrafter, Proposer, Speculator

log = logging.getLogger(__name__)

_SAMPLE_IDS = 512  # ids whose bytes are compared between the two tokenizers


#: load_draft(config, engine) -> (the draft model's runner, its tokenizer)
DraftLoader = Callable[[ServerConfig, EngineConfig], tuple[Any, Any]]


# n-gram proposals cost nothing to make: only the verification of longer drafts limits them
NGRAM_MAX_DRAFT = 16


def build_speculator(
    config: ServerConfig,
    engine: EngineConfig,
    tokenizer: Any,
    vocab: int,
    load_draft: DraftLoader,
    target: Any = None,
) -> Speculator | None:
    """The speculator for `engine.speculative_mode`, None for "disable". `target`: the served
    model's runner (medusa and eagle read its hidden states and LM head)."""
    mode = engine.speculative_mode
    if mode == "disable":
        return None
    proposer: Proposer
    if mode == "ngram":
        proposer = NgramDrafter()
    elif mode == "small_draft":
        if config.draft_model is None:
            raise ConfigError("--speculative-mode small_draft needs --additional-models DRAFT")
        runner, draft_tokenizer = load_draft(config, engine)
        check_same_vocabulary(tokenizer, draft_tokenizer, config.draft_model.model)
        proposer = DraftModelProposer(runner, vocab, engine.prefill_chunk_size)
    else:
        heads = Path(config.draft_model.model) if config.draft_model is not None else None
        proposer = load_heads(mode, heads, target, config.model)
    log.info(
        "speculative decoding: %s, draft length %s, up to %d decoding choices per step",
        mode, engine.spec_draft_length or "adaptive", engine.spec_max_batch,
    )  # fmt: skip
    # medusa: no more than its heads
    longest = NGRAM_MAX_DRAFT if mode == "ngram" else getattr(proposer, "max_length", 8)
    policy = DraftPolicy(max_length=longest)
    return Speculator(
        mode,
        proposer,
        draft_length=engine.spec_draft_length,
        max_batch=engine.spec_max_batch,
        policy=policy,
    )


# EAGLE's draft layer sees this many earlier positions (runtime/eagle.py; the tap's ring)
EAGLE_WINDOW = 256


def load_heads(mode: str, path: Path | None, target: Any, model: str) -> Proposer:
    """medusa's or eagle's proposer over `target` (a TVMRunner compiled with hidden outputs),
    from the heads in `path`, else the ones mlctrio ships for the served model."""
    if target is None or not hasattr(target, "enable_hidden_tap"):
        raise ConfigError(f"--speculative-mode {mode}: {model} has no hidden states to draft from")
    if path is None:
        path = find_shipped(mode, target.model_config)
        if path is None:
            raise ConfigError(
                f"--speculative-mode {mode}: mlctrio ships no {mode} heads for {model}; name "
                f"a heads directory with --additional-models (scripts/spec_heads/ trains them)"
            )
    config, tensors = read_heads(path, mode)
    check_target(path, config, target.model_config)
    shape = target.model_config
    check_shapes(path, mode, config, tensors, shape.hidden_size, shape.vocab_size)
    vocab = tensors["draft_vocab"]
    if "lm_head.weight" in tensors:  # heads with their own LM head rows (for the draft vocab)
        head = DraftHead(vocab, np.ascontiguousarray(tensors["lm_head.weight"]))
    else:
        head = DraftHead.from_runner(target, vocab)
    log.info("%s heads: %s (trained for %s)", mode, path, config["target"].get("name"))
    if mode == "medusa":
        tap = target.enable_hidden_tap(32)  # the last call's rows (a verify: up to 17)
        return MedusaProposer(MedusaHeads.from_tensors(tensors, head), tap)
    tap = target.enable_hidden_tap(EAGLE_WINDOW)
    layer = EagleLayer.from_tensors(tensors, config, head)
    return EagleProposer(layer, tap, target.embed_rows, EAGLE_WINDOW)


def check_same_vocabulary(target: Any, draft: Any, model: str) -> None:
    """ConfigError unless both tokenizers have the same size and bytes for a spread of ids."""
    if target.vocab_size != draft.vocab_size:
        raise ConfigError(
            f"draft model {model}: its vocabulary has {draft.vocab_size} tokens, the served "
            f"model's {target.vocab_size}: a draft model must share the tokenizer"
        )
    step = max(1, target.vocab_size // _SAMPLE_IDS)
    for token_id in range(0, target.vocab_size, step):
        if target.token_bytes(token_id) != draft.token_bytes(token_id):
            raise ConfigError(
                f"draft model {model}: token {token_id} differs between the two tokenizers: "
                "a draft model must share the tokenizer"
            )
