"""The SGLang extension fields sglang-router adds to every request (protocol/sglang.py)."""

from __future__ import annotations

import pytest

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol.openai import parse_chat_request, parse_completion_request

MESSAGES = [{"role": "user", "content": "hi"}]
#: Exactly what sglang-router 0.3.2 sends for {"model": "m", "messages": [...]}.
ROUTER_CHAT = {
    "messages": MESSAGES, "model": "m", "logprobs": False, "stream": False,
    "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
    "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
    "return_hidden_states": False,
}  # fmt: skip
ROUTER_COMPLETION = {
    "model": "m", "prompt": "hi", "stream": False, "echo": False, "no_stop_trim": False,
    "ignore_eos": False, "skip_special_tokens": True, "return_hidden_states": False,
}  # fmt: skip


def test_what_the_router_sends_parses() -> None:
    assert parse_chat_request(ROUTER_CHAT).messages[0].content == "hi"
    assert parse_completion_request(ROUTER_COMPLETION).prompt == "hi"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("no_stop_trim", True),
        ("continue_final_message", True),
        ("return_hidden_states", True),
        ("separate_reasoning", "yes"),
        ("stream_reasoning", 1),
    ],
)
def test_values_mlctrio_cannot_honour_are_a_400_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse_chat_request({**ROUTER_CHAT, field: value})
    assert e.value.param == field


@pytest.mark.parametrize("value", [True, False, None])
def test_reasoning_switches_take_any_boolean(value: object) -> None:
    parse_chat_request({**ROUTER_CHAT, "separate_reasoning": value, "stream_reasoning": value})


def test_other_sglang_fields_stay_unknown() -> None:
    for field in ("rid", "regex", "lora_path", "min_tokens"):
        with pytest.raises(InvalidRequestError) as e:
            parse_chat_request({**ROUTER_CHAT, field: "x"})
        assert e.value.param == field
    with pytest.raises(InvalidRequestError):
        parse_completion_request({**ROUTER_COMPLETION, "continue_final_message": False})
