"""Reasoning output at the HTTP layer: whether a chat or Responses reply is split into reasoning
and content, and the split of each choice (the parser itself is protocol/reasoning.py).

Rules:
- `think_mode` decides once per request, before it is submitted: off with `--reasoning-parser
  none`, and with `auto` (the default) when the model's chat template never mentions `<think>`
  (only HF jinja templates have a source to look in: MLC conv templates and the echo fake's
  never think); on with `deepseek_r1` or `qwen3` (vLLM's names; both mean the `<think>` tags).
  The rendered prompt then says whether the reply starts in reasoning (it ends in an open think
  block) or may open one with a leading `<think>`.
- A constraint that applies from the first generated token (tool_choice required or a named
  tool, response_format json_object / json_schema, vLLM's structured outputs) leaves the model
  no room to reason: the grammar writes the reply from its first token, so that reply is parsed
  as content even when the prompt opened a think block (a think block the grammar itself spells
  at the start is still split off). tool_choice auto's grammar is free text until a call starts,
  so a reply may reason first; the tool-call parser only ever sees the content.
- The parser sits in the output path between the engine's text deltas and everything that reads
  content (the tool-call parser, the chunk and item builders), one `ChoiceThinking` per choice,
  for streamed and whole replies alike, so both shapes always agree.
- Legacy /v1/completions is never parsed (raw text).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..config import ReasoningParser
from ..engine.tokens import ChatTemplate
from ..engine.types import OutputConstraint
from ..protocol.reasoning import (
    THINK_START,
    ReasoningDelta,
    ReasoningStreamParser,
    prompt_opens_think,
)


def template_thinks(template: ChatTemplate) -> bool:
    """Whether the chat template mentions `<think>` (HFChatTemplate.source; templates without a
    jinja source, MLC's conv templates and the echo fake's, never do)."""
    source = getattr(template, "source", "")
    return isinstance(source, str) and THINK_START in source


def grammar_from_first_token(constraint: OutputConstraint | None) -> bool:
    """Whether the constraint decides the reply from its first token (all but tool_choice auto,
    whose grammar is free text until a call starts)."""
    if constraint is None:
        return False
    return not (constraint.kind == "tools" and constraint.tool_choice == "auto")


@attrs.frozen
class ThinkMode:
    """How one request's replies are parsed: `opened`, they start in reasoning."""

    opened: bool

    def choice(self) -> ChoiceThinking:
        return ChoiceThinking(ReasoningStreamParser(self.opened))


def think_mode(
    parser: ReasoningParser,
    template: ChatTemplate,
    prompt: str,
    constraint: OutputConstraint | None,
) -> ThinkMode | None:
    """The request's ThinkMode; None: its replies are not parsed (raw text in content)."""
    if parser == "none" or (parser == "auto" and not template_thinks(template)):
        return None
    opened = prompt_opens_think(prompt) and not grammar_from_first_token(constraint)
    return ThinkMode(opened)


@attrs.define
class ChoiceThinking:
    """One choice's reply split as it streams, and what it added up to."""

    parser: ReasoningStreamParser
    _reasoning: list[str] = attrs.field(factory=list)
    _content: list[str] = attrs.field(factory=list)

    def push(self, text: str, num_tokens: int, final: bool) -> ReasoningDelta:
        """The reasoning and content made final by one delta of `num_tokens` tokens (`final`:
        the choice's last delta, which flushes what was held back)."""
        delta = self.parser.push(text, num_tokens)
        if final:
            end = self.parser.finish()
            delta = ReasoningDelta(delta.reasoning + end.reasoning, delta.content + end.content)
        self._reasoning.append(delta.reasoning)
        self._content.append(delta.content)
        return delta

    @property
    def thought(self) -> bool:
        """Whether the reply had a think block (then reasoning_content is set)."""
        return self.parser.thought

    @property
    def reasoning(self) -> str | None:
        """The whole reasoning text; None when the reply had no think block."""
        return "".join(self._reasoning) if self.thought else None

    @property
    def content(self) -> str:
        return "".join(self._content)


def reasoning_tokens(choices: Sequence[ChoiceThinking] | None) -> int | None:
    """The tokens of every choice's think block; None when no choice had one (the usage then
    has no completion_tokens_details, as before)."""
    if not choices or not any(c.thought for c in choices):
        return None
    return sum(c.parser.reasoning_tokens for c in choices)


def content_or_null(content: str, thinking: ChoiceThinking | None) -> str | None:
    """A message's content: null when a reply that reasoned has nothing after its think block
    (vLLM's shape), else the text as it is."""
    if thinking is not None and thinking.thought and not content:
        return None
    return content
