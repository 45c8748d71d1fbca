"""protocol/reasoning.py: the incremental `<think>` splitter against a whole-text reference,
wherever the text is cut, and the prompt rule that opens reasoning."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlctrio.protocol.reasoning import (
    ReasoningStreamParser,
    prompt_opens_think,
)


def split_reasoning(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """A whole reply as (reasoning, content), pushed in one piece (reasoning None: no think
    block)."""
    parser = ReasoningStreamParser(opened)
    first, last = parser.push(text), parser.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if parser.thought else None), first.content + last.content


_LEADING_THINK = re.compile(r"\s*<think>")


def reference(text: str, opened: bool) -> tuple[str | None, str]:
    """The split by the module's rules, written independently of the state machine."""
    match = _LEADING_THINK.match(text)
    if match:
        text = text[match.end() :]
    elif not opened:
        return None, text
    reasoning, tag, rest = text.partition("</think>")
    return reasoning, rest.lstrip() if tag else ""


def streamed(pieces: list[str], opened: bool) -> tuple[str | None, str, list[tuple[str, str]]]:
    parser = ReasoningStreamParser(opened)
    out = [parser.push(piece) for piece in pieces]
    out.append(parser.finish())
    reasoning = "".join(d.reasoning for d in out)
    return (
        reasoning if parser.thought else None,
        "".join(d.content for d in out),
        [(d.reasoning, d.content) for d in out],
    )


# Texts built from the pieces that matter: tags, their prefixes, whitespace, words.
_ATOMS = [
    "<think>",
    "</think>",
    "<",
    "</",
    "<th",
    "</thi",
    "think>",
    ">",
    " ",
    "\n",
    "a",
    "ok.",
    "é",
]
texts = st.lists(st.sampled_from(_ATOMS), max_size=14).map("".join) | st.text(max_size=30)


@st.composite
def cuts(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    points = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *points, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=600, deadline=None)
@given(cuts(), st.booleans())
def test_any_cut_gives_the_whole_text_split(case: tuple[str, list[str]], opened: bool) -> None:
    text, pieces = case
    reasoning, content, _ = streamed(pieces, opened)
    assert (reasoning, content) == reference(text, opened)
    assert split_reasoning(text, opened=opened) == (reasoning, content)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab <>/\n", max_size=20), st.booleans())
def test_tags_never_leak_into_reasoning(body: str, opened: bool) -> None:
    """Whatever the body, fed a character at a time, no piece holds tag text and the reply
    ends up split at its one closing tag."""
    while "</think>" in body:
        body = body.replace("</think>", "")
    text = ("" if opened else "<think>") + body + "</think>done"
    reasoning, content, pieces = streamed(list(text), opened)
    assert reasoning is not None and content == "done"
    assert all("</think>" not in r and "</think>" not in c for r, c in pieces)
    if not body.lstrip().startswith("<think>"):  # else that tag opens (or reopens) it
        assert reasoning == body


def test_held_back_only_while_a_tag_may_start() -> None:
    parser = ReasoningStreamParser()
    assert parser.push("  <th").content == ""  # may still be <think>
    first = parser.push("ink>Let me see<")
    assert (first.reasoning, first.content) == ("Let me see", "")  # "<" may start </think>
    assert parser.push("b").reasoning == "<b"
    assert parser.push("</thi").reasoning == ""
    end = parser.push("nk>\n\n Paris")
    assert (end.reasoning, end.content) == ("", "Paris")
    assert parser.push(" <think>x").content == " <think>x"  # only a leading tag opens


def test_a_reply_that_does_not_open_is_content_at_once() -> None:
    parser = ReasoningStreamParser()
    assert parser.push("<b").content == "<b"
    assert parser.push("</think>").content == "</think>"
    assert not parser.thought and parser.reasoning_tokens == 0


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nplan\n</think>\n\nParis.", False, ("\nplan\n", "Paris.")),
        ("plan</think>Paris.", True, ("plan", "Paris.")),
        ("<think>plan</think>Paris.", True, ("plan", "Paris.")),  # a repeated opening tag
        ("plan</think>Paris.", False, (None, "plan</think>Paris.")),
        ("<think>cut short by max_tok", False, ("cut short by max_tok", "")),
        ("cut short", True, ("cut short", "")),
        ("<think>done</think>", False, ("done", "")),
        ("\n\n", False, (None, "\n\n")),
        ("", True, ("", "")),
        ("Paris. <think>x</think>", False, (None, "Paris. <think>x</think>")),
    ],
)
def test_split(text: str, opened: bool, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text, opened=opened) == expected


def test_reasoning_tokens_count_the_think_block() -> None:
    parser = ReasoningStreamParser()
    for token in ["\n", "<think>", "a", "b", "</think>", "\n\n", "A", "B"]:
        parser.push(token, 1)
    parser.finish()
    assert parser.reasoning_tokens == 5  # the leading newline and both tags included
    opened = ReasoningStreamParser(opened=True)
    for token in ["<", "b", "</", "think>", "x"]:
        opened.push(token, 1)
    assert opened.reasoning_tokens == 4
    plain = ReasoningStreamParser()
    for token in [" ", "<", "b"]:
        plain.push(token, 1)
    assert plain.reasoning_tokens == 0 and not plain.thought


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<｜User｜>Hi<｜Assistant｜><think>\n", True),  # DeepSeek-R1
        ("<|im_start|>assistant\n<think>\n", True),  # QwQ, Qwen3 thinking
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # enable_thinking false
        ("<think>old</think>answer<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n", False),
        ("user wrote </think> then <think>", True),
    ],
)
def test_prompt_opens_think(prompt: str, opens: bool) -> None:
    assert prompt_opens_think(prompt) is opens
