"""Tool calls in a model's text, turned into OpenAI `tool_calls`, whole or streamed.

Formats (what the grammars in runtime/grammar.py make the model write):

    hermes        <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (repeated)
    llama3_json   {"name": "f", "parameters": {...}}; {...}        (only at the start of the text,
                  optionally after <|python_tag|>)
    mistral       [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]

One state machine serves both: `ToolCallStreamParser.push(delta)` returns what became final
(content and tool-call deltas in OpenAI's streaming shape); `parse_tool_calls(text)` feeds it the
whole text at once. Results never depend on how the text was split (property-tested).

Rules:
- Text outside calls is content. Text that could still be the start of a marker is held back,
  as is trailing whitespace (whitespace next to a call is dropped, so a reply made only of calls
  has content None). Marker text never reaches content for well-formed calls.
- A call is announced (index, id `call_<24 alnum>`, name) as soon as `{"name": "...",
  "arguments": {` has arrived; the arguments then stream as raw fragments of the model's JSON
  text until their object closes. Keys in another order, or arguments that are not an object,
  are parsed when the call's object closes and sent in one delta (arguments re-serialised).
- A call cut off by the end of the text (max_tokens) keeps the arguments that arrived (not
  valid JSON); one cut off before its name completed is dropped; an end marker cut off after a
  complete call is dropped too (it is markup, never content).
- Text that breaks the format (say `<tool_call>oops`) ends tool-call parsing: from the broken
  call on, everything is content. `</tool_call>` inside a hermes argument string ends the call.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs

from mlctrio.protocol.chat import FunctionCall, ToolCall
from mlctrio.protocol.chat_output import DeltaFunctionCall, DeltaToolCall

__all__ = ["ParsedToolCalls", "ToolCallDelta", "ToolCallFormat", "ToolCallStreamParser"]
__all__ += ["accumulate", "new_call_id", "parse_tool_calls"]

ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]
_ALPHANUMERIC = string.ascii_letters + string.digits
_PYTHON_TAG = "<|python_tag|>"
_CALL_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{', re.DOTALL
)
_IN_STRING = re.compile(r'[^"\\]*')
_PLAIN = re.compile(r'[^"{}\[\]]*')


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(24))


@attrs.frozen
class _Format:
    start: str  # marker that opens a group of calls ("": only at the start of the text)
    end: str  # marker that closes it ("": the JSON closes it)
    array: bool  # the group is a JSON array of calls
    separator: str  # between calls in a group ("" if none)


_FORMATS = {
    "hermes": _Format("<tool_call>", "</tool_call>", False, ""),
    "llama3_json": _Format("", "", False, ";"),
    "mistral": _Format("[TOOL_CALLS]", "", True, ","),
}


@attrs.frozen
class ToolCallDelta:
    """What one push made final: content text and tool-call deltas (each index at most once)."""

    content: str = ""
    tool_calls: tuple[DeltaToolCall, ...] = ()


@attrs.frozen
class ParsedToolCalls:
    """A whole reply: content (None when empty) and the complete list of calls."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]

    def finish_reason(self, reason: str) -> str:
        """Gives "tool_calls" for a reply that stopped by itself after calling tools; "length"
        (cut short) and other reasons stay what they are."""
        return "tool_calls" if self.tool_calls and reason == "stop" else reason


def _json_string(body: str) -> str | None:
    """The value of a JSON string literal's body, or None when its escapes are invalid."""
    try:
        value = json.loads(f'"{body}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


@attrs.define
class _JsonScanner:
    """Tracks bracket depth outside JSON strings across chunks."""

    depth: int = 0
    in_string: bool = False
    escape: bool = False

    def feed(self, text: str) -> int | None:
        """Consume `text`; the index just past the bracket that brings depth back to 0, if any."""
        i, n = 0, len(text)
        while i < n:
            if self.escape:
                self.escape, i = False, i + 1
            elif self.in_string:
                i = _IN_STRING.match(text, i).end()  # type: ignore[union-attr]
                if i < n:
                    self.escape, self.in_string = text[i] == "\\", text[i] == "\\"
                    i += 1
            else:
                i = _PLAIN.match(text, i).end()  # type: ignore[union-attr]
                if i < n:
                    char, i = text[i], i + 1
                    if char == '"':
                        self.in_string = True
                    elif char in "{[":
                        self.depth += 1
                    else:
                        self.depth -= 1
                        if self.depth <= 0:
                            return i
        return None


@attrs.define
class ToolCallStreamParser:
    """Splits streamed model text into content and tool-call deltas (see the module rules)."""

    call_format: ToolCallFormat
    new_id: Callable[[], str] = new_call_id
    _fmt: _Format = attrs.field(init=False)
    _buf: str = attrs.field(init=False, default="")  # text not yet decided
    _state: str = attrs.field(init=False, default="text")
    _raw: str = attrs.field(init=False, default="")  # consumed text a format break would emit
    _first: bool = attrs.field(init=False, default=True)  # before the first call of a group
    _obj: str = attrs.field(init=False, default="")  # the current call's JSON, until announced
    _obj_scan: _JsonScanner = attrs.field(init=False, factory=_JsonScanner)
    _args_scan: _JsonScanner | None = attrs.field(init=False, default=None)  # while streaming
    _announced: bool = attrs.field(init=False, default=False)
    _num_calls: int = attrs.field(init=False, default=0)
    _content: list[str] = attrs.field(init=False, factory=list)
    _deltas: list[DeltaToolCall] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self._fmt = _FORMATS[self.call_format]
        self._state = "start" if not self._fmt.start else "text"

    def finish_reason(self, reason: str) -> str:
        """As ParsedToolCalls.finish_reason."""
        return "tool_calls" if self._num_calls and reason == "stop" else reason

    def push(self, text: str) -> ToolCallDelta:
        """Feed a text delta; return the content and tool-call deltas that became final."""
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> ToolCallDelta:
        """End of the text: release what was held back (or drop it, per the rules)."""
        while self._step(final=True):
            pass
        self._buf = ""
        return self._take()

    # --- output ------------------------------------------------------------------------------

    def _take(self) -> ToolCallDelta:
        out = ToolCallDelta("".join(self._content), tuple(self._deltas))
        self._content, self._deltas = [], []
        return out

    def _emit_call(self, name: str, arguments: str) -> None:
        function = DeltaFunctionCall(name=name, arguments=arguments)
        self._deltas.append(DeltaToolCall(self._num_calls, self.new_id(), "function", function))
        self._num_calls += 1

    def _emit_arguments(self, fragment: str) -> None:
        if not fragment:
            return
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == self._num_calls - 1 and last.function is not None:
            merged = (last.function.arguments or "") + fragment
            function = DeltaFunctionCall(name=last.function.name, arguments=merged)
            self._deltas[-1] = attrs.evolve(last, function=function)
        else:
            function = DeltaFunctionCall(arguments=fragment)
            self._deltas.append(DeltaToolCall(self._num_calls - 1, function=function))

    # --- the state machine: each step consumes a prefix of _buf, False when it needs more ----

    def _consume(self, n: int) -> str:
        head, self._buf = self._buf[:n], self._buf[n:]
        return head

    def _break_format(self) -> bool:
        """The text stopped following the format: the broken call and the rest are content."""
        self._content.append(self._raw + self._consume(len(self._buf)))
        self._raw, self._state = "", "sink"
        return False

    def _step(self, final: bool) -> bool:
        state = self._state
        if state == "sink":
            self._content.append(self._consume(len(self._buf)))
            return False
        if state == "start":
            return self._step_start(final)
        if state == "after_group":
            stripped = self._buf.lstrip()
            if not stripped:
                return False
            self._buf = stripped
            self._state = "text" if self._fmt.start else "sink"
            return True
        if state == "text":
            return self._step_text(final)
        region, closed = self._region(final)
        if state == "lead":
            return self._step_lead(region, closed, final)
        if state == "object":
            return self._step_object(region, closed, final)
        return self._step_after_object(region, closed, final)

    def _step_start(self, final: bool) -> bool:
        """llama3_json: calls only if the text opens with `{` or <|python_tag|>."""
        stripped = self._buf.lstrip()
        if stripped.startswith(_PYTHON_TAG):
            self._consume(len(self._buf) - len(stripped) + len(_PYTHON_TAG))
        elif not final and (not stripped or _PYTHON_TAG.startswith(stripped)):
            return False
        elif stripped.startswith("{"):
            self._consume(len(self._buf) - len(stripped))
        else:
            self._state = "sink"
            return True
        self._state, self._raw, self._first = "lead", "", True
        return True

    def _step_text(self, final: bool) -> bool:
        marker = self._fmt.start
        at = self._buf.find(marker)
        if at >= 0:
            before = self._consume(at)
            content = before.rstrip()
            self._content.append(content)
            # The dropped whitespace goes back into content if the call turns out broken.
            self._raw = before[len(content) :] + self._consume(len(marker))
            self._state, self._first = "lead", True
            return True
        if final:
            self._content.append(self._consume(len(self._buf)))
            return False
        keep = len(self._buf) - _partial_suffix(self._buf, marker)
        self._content.append(self._consume(len(self._buf[:keep].rstrip())))
        return False

    def _region(self, final: bool) -> tuple[str, bool]:
        """The part of _buf inside the current group, and whether the group's end marker
        follows it. Without an end marker the group ends where its JSON says."""
        end = self._fmt.end
        if not end:
            return self._buf, False
        at = self._buf.find(end)
        if at >= 0:
            return self._buf[:at], True
        held = 0 if final else _partial_suffix(self._buf, end)
        return self._buf[: len(self._buf) - held], False

    def _end_group(self) -> bool:
        self._consume(len(self._fmt.end))
        self._raw, self._state = "", "after_group"
        return True

    def _step_lead(self, region: str, closed: bool, final: bool) -> bool:
        """Between a group's start and a call's `{`: whitespace, `[` (arrays)."""
        stripped = region.lstrip()
        self._raw += self._consume(len(region) - len(stripped))
        if not stripped:
            if closed:
                return self._break_format()  # an empty group
            if final:
                self._raw, self._state = "", "sink"  # cut off before the call began: dropped
            return False
        if self._fmt.array and self._first and stripped[0] == "[":
            self._raw += self._consume(1)
            self._first = False
            return True
        if stripped[0] != "{" or (self._fmt.array and self._first):
            return self._break_format()
        self._state, self._obj, self._announced = "object", "", False
        self._obj_scan, self._args_scan = _JsonScanner(), None
        return True

    def _step_object(self, region: str, closed: bool, final: bool) -> bool:
        end = self._obj_scan.feed(region)
        part = self._consume(len(region) if end is None else end)
        if not self._announced:
            self._obj += part
            self._raw += part
            head = _CALL_HEAD.match(self._obj)
            name = _json_string(head.group(1)) if head is not None else None
            if head is not None and name is None:  # a broken escape in the name: not a call
                return self._break_format()
            if head is not None and name is not None:
                self._announced, self._raw = True, ""
                self._emit_call(name, "")
                self._args_scan = _JsonScanner()
                part = self._obj[head.end() - 1 :]
            elif end is not None:
                return self._parse_closed_object()
        if self._announced and self._args_scan is not None:
            args_end = self._args_scan.feed(part)
            self._emit_arguments(part if args_end is None else part[:args_end])
            if args_end is not None:
                self._args_scan = None
        if end is not None:
            self._state, self._raw = "after_object", ""
            return True
        if closed:  # the end marker came before the object closed
            return self._end_group() if self._announced else self._break_format()
        if final:
            self._raw, self._state = "", "sink"  # cut off; an unannounced call is dropped
        return False

    def _parse_closed_object(self) -> bool:
        """A complete call object whose head did not match the streaming pattern."""
        try:
            obj: Any = json.loads(self._obj)
        except ValueError:
            obj = None
        name = obj.get("name") if isinstance(obj, dict) else None
        key = next((k for k in ("arguments", "parameters") if k in (obj or {})), None)
        if not isinstance(name, str) or key is None:
            return self._break_format()
        arguments = obj[key]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        self._emit_call(name, arguments)
        self._state, self._raw = "after_object", ""
        return True

    def _step_after_object(self, region: str, closed: bool, final: bool) -> bool:
        stripped = region.lstrip()
        self._raw += self._consume(len(region) - len(stripped))
        if not stripped:
            if closed:
                return self._end_group()
            return False
        fmt, char = self._fmt, stripped[0]
        if final and fmt.end and fmt.end.startswith(stripped) and not closed:
            # The end marker cut off by the end of the text (max_tokens): markup, not content.
            self._consume(len(stripped))
            self._raw, self._state = "", "after_group"
            return False
        if fmt.separator and char == fmt.separator:
            self._raw += self._consume(1)
            self._state = "lead"
            return True
        if fmt.array and char == "]":
            self._consume(1)
            self._raw, self._state = "", "after_group"
            return True
        if not fmt.array and not fmt.end:  # llama3_json: the calls are over, text follows
            self._state = "after_group"
            return True
        return self._break_format()


def accumulate(deltas: Iterable[ToolCallDelta]) -> ParsedToolCalls:
    """Join streamed deltas into the whole reply they describe."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    for delta in deltas:
        content.append(delta.content)
        for call in delta.tool_calls:
            entry = calls.setdefault(call.index, ["", "", ""])
            entry[0] = call.id or entry[0]
            if call.function is not None:
                entry[1] = call.function.name or entry[1]
                entry[2] += call.function.arguments or ""
    tool_calls = tuple(
        ToolCall(id_, "function", FunctionCall(name, arguments))
        for _, (id_, name, arguments) in sorted(calls.items())
    )
    return ParsedToolCalls("".join(content) or None, tool_calls)


def parse_tool_calls(
    text: str, call_format: ToolCallFormat, *, new_id: Callable[[], str] = new_call_id
) -> ParsedToolCalls:
    """Parse a whole reply: content and tool calls."""
    parser = ToolCallStreamParser(call_format, new_id)
    return accumulate([parser.push(text), parser.finish()])
