"""Build the `Speculator` a served model's engine drafts with (`--speculative-mode`).

ngram needs nothing but the mode. small_draft has the draft model (the first
`--additional-models` entry) loaded the way the served model is (model_loader.load_draft), into
its own runner and KV cache, and checks that it speaks the same vocabulary: the draft proposes
token ids the target then verifies, so both must mean the same thing by every id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..config import EngineConfig, ServerConfig
from ..errors import ConfigError
from .draft_model import DraftModelProposer
from .spec_policy import DraftPolicy
from .speculative import NgramDrafter, Proposer, Speculator

log = logging.getLogger(__name__)

_SAMPLE_IDS = 512  # ids whose bytes are compared between the two tokenizers


#: load_draft(config, engine) -> (the draft model's runner, its tokenizer)
DraftLoader = Callable[[ServerConfig, EngineConfig], tuple[Any, Any]]


def build_speculator(
    config: ServerConfig, engine: EngineConfig, tokenizer: Any, vocab: int, load_draft: DraftLoader
) -> Speculator | None:
    """The speculator for `engine.speculative_mode`, None for "disable"."""
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
        raise ConfigError(
            f"--speculative-mode {mode}: no {mode} heads are available for this model; "
            "use ngram or small_draft"
        )
    log.info(
        "speculative decoding: %s, draft length %s, up to %d decoding choices per step",
        mode, engine.spec_draft_length or "adaptive", engine.spec_max_batch,
    )  # fmt: skip
    # n-gram proposals cost nothing to make: only the verification of longer drafts limits them
    policy = DraftPolicy(max_length=16 if mode == "ngram" else 8)
    return Speculator(
        mode,
        proposer,
        draft_length=engine.spec_draft_length,
        max_batch=engine.spec_max_batch,
        policy=policy,
    )


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
