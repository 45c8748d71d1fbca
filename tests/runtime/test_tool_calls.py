"""Tool-call parsing: whole text and streamed in arbitrary pieces give the same reply.

Replies are generated from their parts (content segments and calls), so the expected content and
calls are known independently of the parser.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlctrio.protocol.tool_calls import (
    ParsedToolCalls,
    ToolCallFormat,
    ToolCallStreamParser,
    accumulate,
    new_call_id,
    parse_tool_calls,
)
from mlctrio.runtime.tool_prompt import render_tool_calls, tools_system_prompt
from mlctrio.server.tools import ToolOutput

FORMATS: tuple[ToolCallFormat, ...] = ("hermes", "llama3_json", "mistral")
START = {"hermes": "<tool_call>", "llama3_json": "{", "mistral": "[TOOL_CALLS]"}
# Fragments of markers and brackets that content must be able to carry through unharmed.
TRICKY = ["<", "<tool", "<tool_call", "</tool_call>", "[TOOL", "[TOOL_CALLS", "[", "]", "{", "}"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)  # fmt: skip
arguments = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
names = st.sampled_from(["get_weather", "add", "search_web", 'we"ird\\name'])


def counter_ids() -> Any:
    numbers = itertools.count()
    return lambda: f"id{next(numbers)}"


@st.composite
def calls(draw: st.DrawFn, call_format: ToolCallFormat) -> tuple[str, str, str]:
    """(call JSON text, name, expected arguments string)."""
    name, args = draw(names), draw(arguments)
    key = "parameters" if call_format == "llama3_json" else "arguments"
    args_text = json.dumps(args, ensure_ascii=draw(st.booleans()), indent=draw(
        st.sampled_from([None, 2])))  # fmt: skip
    name_json = json.dumps(name)
    space = draw(st.sampled_from(["", " ", "\n  "]))
    if draw(st.integers(0, 4)) == 0:  # another key order: parsed whole, re-serialised
        text = f'{{"{key}":{space}{args_text}, "name": {name_json}}}'
        return text, name, json.dumps(args, ensure_ascii=False)
    return f'{{{space}"name": {name_json}, "{key}":{space}{args_text}{space}}}', name, args_text


def content(call_format: ToolCallFormat) -> st.SearchStrategy[str]:
    pieces = st.lists(st.sampled_from(TRICKY) | st.text(" \n\tab<>/_[]{}x", max_size=6),
                      max_size=5).map("".join)  # fmt: skip
    return pieces.filter(lambda s: START[call_format] not in s)


@st.composite
def replies(draw: st.DrawFn, call_format: ToolCallFormat) -> tuple[str, str | None, list[Any]]:
    """(reply text, expected content, expected [(name, arguments)])."""
    made = draw(st.lists(calls(call_format), max_size=3))
    expected = [(name, args) for _, name, args in made]
    if call_format == "llama3_json":
        if not made:
            text = draw(content(call_format).filter(lambda s: not s.lstrip().startswith("{")))
            return text, text or None, []
        lead = draw(st.sampled_from(["", " ", "\n", "<|python_tag|>"]))
        after = draw(content(call_format).filter(lambda s: not s.lstrip().startswith(";")))
        text = lead + "; ".join(t for t, _, _ in made) + after
        return text, after.lstrip() or None, expected
    segments = [draw(content(call_format)) for _ in range(len(made) + 1)]
    if not made:
        return segments[0], segments[0] or None, []
    if call_format == "hermes":
        bodies = [f"<tool_call>\n{t}\n</tool_call>" for t, _, _ in made]
        text = "".join(s + b for s, b in zip(segments, bodies, strict=False)) + segments[-1]
        kept = [segments[0].rstrip(), *(s.strip() for s in segments[1:-1]), segments[-1].lstrip()]
    else:
        text = segments[0] + "[TOOL_CALLS][" + ", ".join(t for t, _, _ in made) + "]"
        text += segments[-1]
        kept = [segments[0].rstrip(), segments[-1].lstrip()]
    return text, "".join(kept) or None, expected


def stream(text: str, call_format: ToolCallFormat, cuts: list[int]) -> ParsedToolCalls:
    parser = ToolCallStreamParser(call_format, counter_ids())
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]
    deltas = [parser.push(p) for p in pieces] + [parser.finish()]
    # OpenAI's streaming shape: a call's first delta has id, type and name; later ones only
    # argument text; indices appear in order.
    seen: set[int] = set()
    for delta in deltas:
        assert len({c.index for c in delta.tool_calls}) == len(delta.tool_calls)
        for call in delta.tool_calls:
            first = call.index not in seen
            assert (call.id is not None) == first and (call.type == "function") == first
            assert call.function is not None and (call.function.name is not None) == first
            assert call.index == len(seen) - (not first) and (first or call.function.arguments)
            seen.add(call.index)
    return accumulate(deltas)


def summary(parsed: ParsedToolCalls) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c.function.name, c.function.arguments) for c in parsed.tool_calls]


@pytest.mark.parametrize("call_format", FORMATS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streamed_equals_whole_and_expected(call_format: ToolCallFormat, data: Any) -> None:
    text, expected_content, expected_calls = data.draw(replies(call_format))
    whole = parse_tool_calls(text, call_format, new_id=counter_ids())
    assert summary(whole) == (expected_content, expected_calls), text
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert summary(stream(text, call_format, cuts)) == summary(whole)
    assert stream(text, call_format, list(range(len(text)))) == whole  # char by char, ids too


@pytest.mark.parametrize("call_format", FORMATS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_cut_short_and_broken_replies_stream_like_whole(
    call_format: ToolCallFormat, data: Any
) -> None:
    """max_tokens cuts anywhere, and junk anywhere: no crash, split-independent."""
    text, _, _ = data.draw(replies(call_format))
    cut = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.sampled_from(["", "oops", "}", "]", ";", "\n</tool_call>"]))
    at = data.draw(st.integers(0, cut))
    text = text[:at] + junk + text[at:cut]
    whole = parse_tool_calls(text, call_format, new_id=counter_ids())
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert summary(stream(text, call_format, cuts)) == summary(whole)


def test_hermes_example_deltas() -> None:
    parser = ToolCallStreamParser("hermes", counter_ids())
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    pieces = [text[:14], text[14:40], text[40:60], text[60:], "</tool_call>"]
    deltas = [parser.push(p) for p in pieces] + [parser.finish()]
    assert "".join(d.content for d in deltas) == "Checking."
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].id == "id0" and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    args = "".join(c.function.arguments or "" for c in calls if c.function is not None)
    assert args == '{"city": "Paris"}'
    assert parser.finish_reason("stop") == "tool_calls"
    assert parser.finish_reason("length") == "length"


def test_truncated_calls() -> None:
    cut = parse_tool_calls('Hi <tool_call>\n{"name": "f", "arguments": {"a": [1, 2', "hermes")
    assert summary(cut) == ("Hi", [("f", '{"a": [1, 2')])
    assert cut.finish_reason("length") == "length"
    nameless = parse_tool_calls('Hi <tool_call>\n{"name": "get_wea', "hermes")
    assert summary(nameless) == ("Hi", []) and nameless.finish_reason("stop") == "stop"


def test_end_marker_cut_after_a_complete_call_is_dropped() -> None:
    """max_tokens inside `</tool_call>` after a complete call: the call stands, no markup leaks
    into content, whatever the cut and however the text streams."""
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
    for cut in range(len("</tool_call>")):
        text = call + "</tool_call>"[:cut]
        parsed = parse_tool_calls(text, "hermes")
        assert parsed.content is None, (cut, parsed.content)
        assert [(c.function.name, c.function.arguments) for c in parsed.tool_calls] == [
            ("f", '{"a": 1}')
        ]
        parser = ToolCallStreamParser("hermes")
        deltas = [parser.push(ch) for ch in text] + [parser.finish()]
        assert not "".join(d.content for d in deltas)
    # A genuine second call is still parsed after a complete first one.
    two = parse_tool_calls(call + "</tool_call>\n" + call + "</tool_call>", "hermes")
    assert len(two.tool_calls) == 2 and two.content is None


def test_broken_call_becomes_content() -> None:
    broken = parse_tool_calls("a <tool_call>oops</tool_call> b", "hermes")
    assert summary(broken) == ("a <tool_call>oops</tool_call> b", [])
    text_args = parse_tool_calls(
        '[TOOL_CALLS][{"name": "f", "arguments": "{\\"x\\": 1}"}]', "mistral"
    )
    assert summary(text_args) == (None, [("f", '{"x": 1}')])


def test_call_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    for call_id in ids:
        assert call_id.startswith("call_") and len(call_id) == 29 and call_id[5:].isalnum()


@pytest.mark.parametrize("call_format", FORMATS)
def test_calls_written_into_a_prompt_parse_back(call_format: ToolCallFormat) -> None:
    # What a template without tool_calls support shows the model (runtime/tool_prompt.py) is
    # exactly what the parser reads back: the model sees its own format in the history.
    calls = [
        {"id": "a", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "now", "arguments": {}}},
    ]  # fmt: skip
    text = render_tool_calls(calls, call_format)
    parsed = parse_tool_calls(text, call_format)
    assert parsed.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
    ]
    example = tools_system_prompt([{"type": "function", "function": {"name": "f"}}], call_format)
    assert text.split("get_weather")[0] in example  # the prompt shows the same syntax


def test_auto_parses_a_call_when_written_and_content_otherwise() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    whole = ToolOutput.whole(call, "hermes", "stop")
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    (parsed,) = whole["message"]["tool_calls"]
    assert parsed["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    plain = ToolOutput.whole("Paris is sunny today.", "hermes", "stop")
    assert plain == {
        "message": {"role": "assistant", "content": "Paris is sunny today.", "refusal": None},
        "finish_reason": "stop",
    }
    cut = ToolOutput.whole("<tool_call>\n", "hermes", "length")  # max_tokens inside a call
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]
