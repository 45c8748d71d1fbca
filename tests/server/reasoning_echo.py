"""A server on the echo fake whose chat template thinks, for the reasoning tests
(test_reasoning.py: chat completions; test_reasoning_responses.py: the Responses API).

The echo fake "generates" its rendered prompt, one byte token per step, so every tag arrives
split across deltas. `TEMPLATE` renders the messages' contents (an assistant's
reasoning_content as `<think>...</think>` before it), then `<|endoftext|>` (the echo's EOS: the
reply ends there), the tools, then the generation prompt, which opens a think block
(`<think>\\n`, as DeepSeek-R1's and Qwen3's thinking templates end) when `enable_thinking` is
set: so the user's message is the reply, and `chat_template_kwargs` decide whether it starts in
reasoning; `reasoning_effort`, when set, comes first. The grammar compiler is real (llguidance
over the byte tokenizer), for tools and response formats.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema

from mlctrio.runtime.chat_template import HFChatTemplate

from .conftest import ServerHandle
from .grammar_echo import grammar_echo_server

MODEL = "mock://echo"
TEMPLATE = (
    "{% if reasoning_effort is defined %}[effort={{ reasoning_effort }}]{% endif %}"
    "{% for m in messages %}"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content or '' }}{% endfor %}<|endoftext|>{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}
REPLY = "<think>\nThe user asks for a capital.\n</think>\n\nParis."
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False},
    },
}  # fmt: skip
CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n</tool_call>'
)


def thinking_echo_server(**settings: Any) -> Iterator[ServerHandle]:
    """The server (a generator, for a fixture to `yield from`); `settings`: ServerConfig
    fields (e.g. reasoning_parser)."""
    template = HFChatTemplate({"default": TEMPLATE})
    with grammar_echo_server(
        template, model_id=MODEL, tool_call_format="hermes", context_window=4096,
        total_pages=1024, **settings,
    ) as handle:  # fmt: skip
        yield handle


def post(handle: ServerHandle, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=handle.url, timeout=60) as http:
        response = http.post(path, json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def chat(handle: ServerHandle, text: str, **body: Any) -> dict[str, Any]:
    return post(
        handle, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **body}
    )


def events(handle: ServerHandle, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=handle.url, timeout=60) as http:
        with http.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    return [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]


def streamed_chat(handle: ServerHandle, text: str, **body: Any) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": text}]
    return events(handle, "/v1/chat/completions", {"messages": messages, **body})


def joined(chunks: list[dict[str, Any]], key: str, index: int = 0) -> str | None:
    """One choice's deltas of `key` concatenated; None when no delta had the key."""
    parts = [
        c["choices"][0]["delta"][key]
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index and key in c["choices"][0]["delta"]
    ]
    return "".join(parts) if parts else None


@functools.cache
def openapi(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url) as http:
        doc: dict[str, Any] = http.get("/openapi.json").json()
    return doc


def openapi_check(handle: ServerHandle, path: str, instance: object, stream: bool) -> None:
    """The instance is what /openapi.json says the route sends (whole, or one stream event)."""
    doc = openapi(handle.url)
    content = doc["paths"][path]["post"]["responses"]["200"]["content"]
    schema = (
        content["text/event-stream"]["x-sse-data"]
        if stream
        else content["application/json"]["schema"]
    )
    jsonschema.validate(instance, {**schema, "components": doc["components"]})
