"""From `OutputConstraint` values (engine/types.py) to compiled grammars and per-choice matchers.

One `ConstraintCompiler` per served model. The server calls `check()` off the event loop before a
request is accepted (a schema that cannot be compiled is a 400 before any stream starts); the
engine core calls `matcher()` when it admits the request, one matcher per choice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..engine.types import OutputConstraint
from .grammar import CompiledGrammar, GrammarCompiler, GrammarMatcher


class ConstraintCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] = ()) -> None:
        self._grammars = GrammarCompiler(
            tokenizer, vocab_size=vocab_size, stop_token_ids=tuple(stop_token_ids)
        )

    def compile(self, c: OutputConstraint) -> CompiledGrammar:
        """Compile (or fetch from the cache); raises grammar.GrammarError (a 400) if impossible."""
        g = self._grammars
        if c.kind == "json_object":
            return g.json_object()
        if c.kind == "json_schema":
            return g.json_schema(json.loads(c.schema), strict=c.strict)
        if c.kind == "json_schema_string":
            return g.json_schema_string(c.schema)
        if c.kind == "regex":
            return g.regex(c.schema)
        if c.kind == "choice":
            return g.choice(json.loads(c.schema))
        if c.kind == "grammar":
            return g.lark(c.schema)
        choice: Any = (
            c.tool_choice if c.tool_choice in ("auto", "required") else {"name": c.tool_choice}
        )
        return g.tools(
            json.loads(c.tools),
            choice,
            parallel=c.parallel,
            call_format=c.call_format,  # type: ignore[arg-type]
        )

    def check(self, c: OutputConstraint) -> None:
        self.compile(c)

    def matcher(self, c: OutputConstraint) -> GrammarMatcher:
        return self.compile(c).matcher()
