"""`ModelInfo`: what the server needs to know about the served model, as the loader builds it.

Rules: a plain frozen record of engine-level types (tokenizer, chat template, limits), so both the
loaders below (runtime/model_loader.py, loader.py) and the service/server above can name it
without importing each other; this module imports nothing but mlctrio.engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .request import EngineLimits
from .tokens import ChatTemplate, Tokenizer
from .types import OutputConstraint, Pooling


@attrs.frozen
class ModelInfo:
    """What the server needs to know about the served model."""

    model_id: str
    context_window_size: int
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    created: int = attrs.field(factory=lambda: int(time.time()))
    config: Mapping[str, Any] = attrs.field(factory=dict)
    #: Compiles an OutputConstraint (raising a 400-style error if it cannot); None: the model
    #: has no grammar support (e.g. mock://echo) and constraints are refused.
    check_constraint: Callable[[OutputConstraint], None] | None = None
    tool_call_format: str = "hermes"
    #: parallel_tool_calls when a request leaves it unset: True (OpenAI's default) for templates
    #: that render tools themselves; False where mlctrio injects the tool prompt (the model was
    #: not trained to call tools, let alone several: small ones repeat one call until max_tokens;
    #: llama.cpp's default is False too).
    parallel_tool_calls: bool = True
    #: The engine's admission limits (n vs max_num_sequence, prompt vs window and KV cache),
    #: checked before a request is submitted so a refusal is a 400 before any stream starts.
    limits: EngineLimits | None = None
    #: Width of the model's hidden state (an embedding's length) and how /v1/embeddings pools
    #: it; None: the model computes no embeddings.
    hidden_size: int | None = None
    pooling: Pooling = "mean"
