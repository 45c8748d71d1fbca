"""A thinking model's reply split into reasoning and content: `<think>reasoning</think>content`.

Qwen3, QwQ and the DeepSeek-R1 distills write their reasoning between `<think>` and `</think>`
before the answer. `ReasoningStreamParser` splits the generated text as it streams, the way
vLLM's `deepseek_r1` / `qwen3` reasoning parsers and llama.cpp's `reasoning_content` do:

- The initial state comes from the rendered prompt (`prompt_opens_think`): a prompt that ends
  inside an open think block (DeepSeek-R1's template, Qwen3's and QwQ's thinking generation
  prompts end with `<think>\\n`) starts the reply in reasoning, with no opening tag in the
  output. Otherwise only a reply that begins, after optional whitespace, with `<think>` enters
  reasoning; a `<think>` anywhere else is plain text. A leading `<think>` is dropped in both cases
  (some models repeat the tag their prompt opened).
- Reasoning ends at the first `</think>`; whitespace right after it is dropped (llama.cpp does the
  same), and everything after it is content. A reply that ends while still in reasoning
  (max_tokens) is all reasoning.
- Tag text is never emitted, and text is held back only while it may still be the start of a
  tag: leading whitespace and a prefix of `<think>` before the first other character, a prefix
  of `</think>` at the end of reasoning text.
- `reasoning_tokens` counts the generated tokens of the pieces pushed while in reasoning (the
  closing tag's included): exact when each piece is one token, as in plain decoding.

Rules: pure text logic over what the caller pushes (no engine or HTTP types); the concatenated
pieces of a stream equal what one push of the whole text gives, wherever the text was cut.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

THINK_START: Final = "<think>"
THINK_END: Final = "</think>"

_State = Literal["opening", "reasoning", "after", "content"]


def prompt_opens_think(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open think block (its last `<think>` comes
    after its last `</think>`), so the reply starts in reasoning."""
    start = prompt.rfind(THINK_START)
    return start >= 0 and start > prompt.rfind(THINK_END)


def _held_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@attrs.frozen
class ReasoningDelta:
    """What one push made final: reasoning text and content text (either may be empty)."""

    reasoning: str = ""
    content: str = ""


@attrs.define
class ReasoningStreamParser:
    """Splits one choice's streamed text into reasoning and content (see the module rules)."""

    #: The prompt opened a think block: the reply starts in reasoning.
    opened: bool = False
    #: Generated tokens pushed while in reasoning.
    reasoning_tokens: int = attrs.field(init=False, default=0)
    #: Whether the reply had a think block (opened by the prompt, or by its leading `<think>`).
    thought: bool = attrs.field(init=False, default=False)
    _state: _State = attrs.field(init=False, default="opening")
    _pending: str = attrs.field(init=False, default="")  # held back: a possible tag's start
    _pending_tokens: int = attrs.field(init=False, default=0)  # tokens of the opening text

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def push(self, text: str, num_tokens: int = 0) -> ReasoningDelta:
        """The reasoning and content that became final with `text` (`num_tokens` tokens)."""
        reasoning: list[str] = []
        content = ""
        if self._state == "opening":  # its tokens count once it is known to be reasoning
            self._pending_tokens += num_tokens
            text = self._opening(text)
        elif self._state == "reasoning":
            self.reasoning_tokens += num_tokens
        if self._state == "reasoning":
            text = self._reasoning(text, reasoning)
        if self._state == "after":
            text = text.lstrip()
            if text:
                self._state = "content"
        if self._state == "content":
            content = text
        return ReasoningDelta("".join(reasoning), content)

    def finish(self) -> ReasoningDelta:
        """What was held back, once the reply is complete."""
        held, self._pending = self._pending, ""
        if self._state == "opening":
            self._state = "reasoning" if self.opened else "content"
            if self.opened:
                self._enter_reasoning()
                return ReasoningDelta(reasoning=held)
            return ReasoningDelta(content=held)
        if self._state == "reasoning":
            return ReasoningDelta(reasoning=held)
        return ReasoningDelta()

    def _enter_reasoning(self) -> None:
        self.thought = True
        self.reasoning_tokens += self._pending_tokens
        self._pending_tokens = 0

    def _opening(self, text: str) -> str:
        """Before the first non-space character that rules out a leading `<think>`: hold back,
        or leave this state; return the text the next state takes."""
        whole = self._pending + text
        stripped = whole.lstrip()
        if not stripped or (len(stripped) < len(THINK_START) and THINK_START.startswith(stripped)):
            self._pending = whole
            return ""
        self._pending = ""
        if stripped.startswith(THINK_START):
            self._state = "reasoning"
            self._enter_reasoning()
            return stripped[len(THINK_START) :]
        if self.opened:
            self._state = "reasoning"
            self._enter_reasoning()
        else:
            self._state = "content"
            self._pending_tokens = 0
        return whole

    def _reasoning(self, text: str, out: list[str]) -> str:
        """Reasoning text up to `</think>` into `out`; return the text after the tag."""
        whole = self._pending + text
        end = whole.find(THINK_END)
        if end >= 0:
            self._pending = ""
            out.append(whole[:end])
            self._state = "after"
            return whole[end + len(THINK_END) :]
        keep = _held_suffix(whole, THINK_END)
        self._pending = whole[len(whole) - keep :] if keep else ""
        out.append(whole[: len(whole) - keep])
        return ""
