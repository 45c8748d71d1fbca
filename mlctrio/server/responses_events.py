"""The output of one /v1/responses reply, built from the generated text: its items, and the
stream events that announce them.

Rules:
- One `OutputBuilder` serves both shapes: streamed, its events are written as they come;
  whole, they are dropped and only `response()` is sent. So both shapes always agree.
- Event order is OpenAI's: response.created, response.in_progress; per reasoning item
  output_item.added, content_part.added, reasoning_text.delta..., reasoning_text.done,
  content_part.done, output_item.done; per message item the same with output_text; per function
  call output_item.added, function_call_arguments.delta..., function_call_arguments.done,
  output_item.done; then response.completed (response.incomplete when max_output_tokens cut it
  short, response.failed when the engine failed). `sequence_number` counts every event from 0.
- A thinking model's think block (split off as for chat, server/reasoning.py) becomes a
  reasoning item, its text in `content` as `reasoning_text` (vLLM's shape: no summary, nothing
  encrypted); the rest is text, a message item, and tool calls (parsed from that text only, as
  for chat, server/tools.py) become function_call items, in the order the model wrote them.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..engine.types import RequestOutput, Usage
from ..errors import EngineFailedError, RequestError
from ..protocol.openai import to_json
from ..protocol.responses import ItemStatus
from ..protocol.responses_output import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputReasoningText,
    OutputTextContent,
    OutputTokensDetails,
    ResponseError,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
    new_item_id,
)
from . import tools
from .reasoning import ChoiceThinking
from .sse import dumps

Event = dict[str, Any]

ABORTED = "The request was aborted before it finished."


def sse(event: Event) -> bytes:
    """One event as OpenAI frames it: an `event:` line naming the type, then the data."""
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def usage_of(usage: Usage, reasoning_tokens: int = 0) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens),
        total_tokens=usage.total_tokens,
    )


@attrs.define
class _Item:
    """An output item being generated: a message's text, a think block's text or a call's
    arguments, in pieces."""

    id: str
    call_id: str | None = None  # None: a message or reasoning
    name: str = ""
    parts: list[str] = attrs.field(factory=list)
    status: ItemStatus = "in_progress"
    reasoning: bool = False

    def value(self, status: ItemStatus) -> OutputItem:
        text = "".join(self.parts)
        if self.reasoning:
            thought = (OutputReasoningText("reasoning_text", text),)
            return OutputReasoning(id=self.id, status=status, content=thought)
        if self.call_id is None:
            content = (OutputTextContent("output_text", text),)
            return OutputMessage(id=self.id, status=status, content=content)
        return OutputFunctionCall(
            id=self.id,
            status=status,
            call_id=self.call_id,
            name=self.name,
            arguments=text,
        )


@attrs.define
class OutputBuilder:
    """Builds one response's output items and stream events (see the module rules)."""

    head: ResponseObject  # status in_progress, no output: the fields every event repeats
    call_format: str | None  # the tool-call format when the reply may hold calls
    thinking: ChoiceThinking | None = None  # the reply's reasoning split, when parsed
    items: list[_Item] = attrs.field(factory=list)
    closed: int = 0  # items before this index are done
    sequence: int = 0
    finish_reason: str | None = None
    #: The final response, once finish() or failed() built it.
    result: ResponseObject | None = None
    parser: tools.ToolOutput | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.parser = tools.ToolOutput(self.call_format) if self.call_format else None

    def _event(self, type_: str, **fields: Any) -> Event:
        event = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _lifecycle(self, type_: str, response: ResponseObject) -> Event:
        return self._event(type_, response=to_json(response))

    def start(self) -> list[Event]:
        return [
            self._lifecycle("response.created", self.head),
            self._lifecycle("response.in_progress", self.head),
        ]

    def push(self, text: str, finish_reason: str | None, num_tokens: int = 0) -> list[Event]:
        """Events for one piece of generated text of `num_tokens` tokens (the last one carries
        the finish reason)."""
        final = finish_reason is not None
        events: list[Event] = []
        if self.thinking is not None:
            split = self.thinking.push(text, num_tokens, final)
            if split.reasoning:
                events += self._reasoning(split.reasoning)
            text = split.content
        if self.parser is None:
            content, calls = text, list[dict[str, Any]]()
        else:
            content, calls = self.parser.push(text, final)
        if content:
            events += self._content(content)
        for call in calls:
            events += self._call(call)
        if final:
            assert finish_reason is not None
            self.finish_reason = (
                self.parser.finish_reason(finish_reason) if self.parser else finish_reason
            )
        return events

    def _open(self, item: _Item) -> list[Event]:
        events = self._close("completed")
        self.items.append(item)
        added = self._event(
            "response.output_item.added",
            output_index=len(self.items) - 1,
            item=to_json(item.value("in_progress")),
        )
        return [*events, added]

    def _current(self) -> _Item | None:
        return self.items[-1] if len(self.items) > self.closed else None

    def _text(self, text: str, reasoning: bool) -> tuple[_Item, list[Event]]:
        """Add text to the open message (reasoning: think block) item, opening one if the
        open item is of another kind; its events but the delta."""
        events: list[Event] = []
        item = self._current()
        if item is None or item.call_id is not None or item.reasoning != reasoning:
            item = _Item(new_item_id("rs" if reasoning else "msg"), reasoning=reasoning)
            events += self._open(item)
            part = (
                OutputReasoningText("reasoning_text", "")
                if reasoning
                else OutputTextContent("output_text", "")
            )
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=len(self.items) - 1,
                    content_index=0,
                    part=to_json(part),
                )
            )
        item.parts.append(text)
        return item, events

    def _content(self, text: str) -> list[Event]:
        return self._delta(text, reasoning=False)

    def _reasoning(self, text: str) -> list[Event]:
        return self._delta(text, reasoning=True)

    def _delta(self, text: str, reasoning: bool) -> list[Event]:
        """Text into the open message or reasoning item: output_text.delta (with its empty
        logprobs) or reasoning_text.delta."""
        item, events = self._text(text, reasoning)
        kind, extra = ("reasoning_text", {}) if reasoning else ("output_text", {"logprobs": []})
        events.append(
            self._event(
                f"response.{kind}.delta",
                item_id=item.id,
                output_index=len(self.items) - 1,
                content_index=0,
                delta=text,
                **extra,
            )
        )
        return events

    def _call(self, delta: dict[str, Any]) -> list[Event]:
        """A chat tool-call delta: a new call carries its id and name, then argument text."""
        events: list[Event] = []
        function = delta.get("function") or {}
        item = self._current()
        if "id" in delta or item is None or item.call_id is None:
            item = _Item(new_item_id("fc"), delta.get("id") or "", function.get("name") or "")
            events += self._open(item)
        if arguments := function.get("arguments"):
            item.parts.append(arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=len(self.items) - 1,
                    delta=arguments,
                )
            )
        return events

    def _close(self, status: ItemStatus) -> list[Event]:
        """The done events of the open item, if any."""
        item = self._current()
        if item is None:
            return []
        index, self.closed = self.closed, self.closed + 1
        item.status = status
        value = item.value(status)
        where = {"item_id": item.id, "output_index": index}
        if isinstance(value, OutputMessage):
            (part,) = value.content
            events = [
                self._event(
                    "response.output_text.done", **where, content_index=0, text=part.text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done", **where, content_index=0, part=to_json(part)
                ),
            ]  # fmt: skip
        elif isinstance(value, OutputReasoning):
            (thought,) = value.content
            events = [
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=thought.text
                ),
                self._event(
                    "response.content_part.done", **where, content_index=0,
                    part=to_json(thought),
                ),
            ]  # fmt: skip
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done", **where, arguments=value.arguments
                )
            ]
        events.append(
            self._event("response.output_item.done", output_index=index, item=to_json(value))
        )
        return events

    def response(
        self,
        usage: Usage,
        *,
        status: ResponseStatus = "completed",
        error: RequestError | None = None,
    ) -> ResponseObject:
        """The response as it stands (an item still open counts as incomplete)."""
        output = tuple(
            item.value(item.status if item.status != "in_progress" else "incomplete")
            for item in self.items
        )
        thinking = self.thinking
        return attrs.evolve(
            self.head,
            status=status,
            output=output,
            usage=usage_of(usage, thinking.parser.reasoning_tokens if thinking else 0),
            incomplete_details=(
                IncompleteDetails("max_output_tokens") if status == "incomplete" else None
            ),
            error=ResponseError("server_error", error.message) if error is not None else None,
        )

    def finish(self, usage: Usage) -> list[Event]:
        """The closing events: the open item's done events, then response.completed, or
        response.incomplete when the token limit cut the reply, or response.failed when the
        engine aborted it."""
        if self.finish_reason in ("abort", "error"):
            return self.failed(EngineFailedError(ABORTED), usage)
        status: ItemStatus = "incomplete" if self.finish_reason == "length" else "completed"
        events = self._close(status)
        self.result = self.response(usage, status=status)
        events.append(self._lifecycle(f"response.{status}", self.result))
        return events

    def failed(self, error: RequestError, usage: Usage) -> list[Event]:
        self.result = self.response(usage, status="failed", error=error)
        return [self._lifecycle("response.failed", self.result)]


@attrs.define
class ResponsesWriter:
    """The streaming.StreamWriter of a streamed response: SSE framing around OutputBuilder."""

    builder: OutputBuilder
    usage: Usage

    def opening(self) -> list[bytes]:
        return [sse(e) for e in self.builder.start()]

    def output_events(self, output: RequestOutput) -> list[bytes]:
        self.usage = output.usage
        events: list[Event] = []
        for d in output.deltas:
            if d.text or d.token_ids or d.finish_reason is not None:
                events += self.builder.push(d.text, d.finish_reason, len(d.token_ids))
        return [sse(e) for e in events]

    def closing(self) -> list[bytes]:
        return [sse(e) for e in self.builder.finish(self.usage)]

    def failure(self, error: RequestError) -> bytes:
        """How the stream ends when the engine or the deadline fails it: response.failed."""
        return b"".join(sse(e) for e in self.builder.failed(error, self.usage))
