"""A server on the echo model with a real grammar compiler: constrained output (tools,
json_schema) through llguidance over the echo's byte tokenizer, without compiling a model.

    with grammar_echo_server(template, model_id="m", tool_call_format="hermes") as handle: ...

Shared by the tool-template and Responses tests (fast tier).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import mlctrio.serve
from mlctrio.config import EngineConfig
from mlctrio.engine.model_info import ModelInfo
from mlctrio.engine.tokens import ChatTemplate
from mlctrio.runtime.constraints import ConstraintCompiler
from mlctrio.runtime.core import EngineCore
from mlctrio.testing.echo import ByteTokenizer, EchoRunner

from .conftest import ServerHandle, make_config, start_server


class GrammarByteTokenizer(ByteTokenizer):
    """The echo's byte tokenizer with the surface the grammar compiler reads."""

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(range(256, self.vocab_size))

    def token_to_id(self, text: str) -> int | None:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 and ids[0] >= 256 else None


@contextmanager
def grammar_echo_server(
    template: ChatTemplate,
    *,
    model_id: str,
    tool_call_format: str,
    context_window: int = 8192,
    total_pages: int = 4096,
    **settings: Any,
) -> Iterator[ServerHandle]:
    """`settings`: ServerConfig fields of the server (e.g. reasoning_parser)."""

    def factory(config: Any) -> Callable[[], tuple[EngineCore, ModelInfo]]:
        def build() -> tuple[EngineCore, ModelInfo]:
            tokenizer = GrammarByteTokenizer()
            runner = EchoRunner(
                vocab_size=tokenizer.vocab_size, eos_token_id=256, total_pages=total_pages,
                context_window_size=context_window,
            )  # fmt: skip
            compiler = ConstraintCompiler(tokenizer, tokenizer.vocab_size)
            engine_config = EngineConfig(
                "mock://echo", max_num_sequence=8, context_window_size=context_window,
                prefix_cache_mode="disable",
            )  # fmt: skip
            core = EngineCore(runner, tokenizer, engine_config, constraints=compiler)
            info = ModelInfo(
                model_id=model_id,
                context_window_size=runner.context_window_size,
                tokenizer=tokenizer,
                chat_template=template,
                check_constraint=compiler.check,
                tool_call_format=tool_call_format,
                limits=core.scheduler.limits,
            )
            return core, info

        return build

    patch = pytest.MonkeyPatch()
    patch.setattr(mlctrio.serve, "core_factory", factory)
    try:
        handle = start_server(make_config(**settings))
    finally:
        patch.undo()
    try:
        yield handle
    finally:
        handle.stop()
