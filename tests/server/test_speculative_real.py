"""Speculative decoding on the real default model (SmolLM2-135M-Instruct), through the SDK.

With temperature 0 a server that drafts (n-gram lookup, a draft model, the shipped Medusa heads
or EAGLE layer) answers exactly what a server that does not draft answers: chat and
completions, streamed and not, with and without a json_schema. The drafts are forced (a fixed
draft length of 4) so that verification really runs on every request; /metrics counts the
drafts and /debug/config names the mode. The draft model here is the served model itself with
the same kernels: it must be accepted almost always.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from mlctrio.cli import DEFAULT_MODEL
from mlctrio.config import EngineOverrides, ModelSpec, default_served_name

from .conftest import ServerHandle, make_config, start_server

pytestmark = pytest.mark.slow
MODEL = default_served_name(DEFAULT_MODEL)
FORCED = EngineOverrides(spec_draft_length=4)
MODES = ["ngram", "small_draft", "medusa", "eagle"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def servers(smollm2_gguf: object) -> Iterator[dict[str, ServerHandle]]:
    """The default model served plainly and in each drafting mode (medusa and eagle find the
    heads mlctrio ships for it with no further flag)."""
    common = {"model": DEFAULT_MODEL, "activations": "f32", "enable_debug": True}
    handles: dict[str, ServerHandle] = {}
    try:
        handles["plain"] = start_server(make_config(**common), load_timeout_s=600)
        handles["ngram"] = start_server(
            make_config(**common, speculative_mode="ngram", overrides=FORCED), load_timeout_s=600
        )
        handles["small_draft"] = start_server(
            make_config(
                **common,
                speculative_mode="small_draft",
                draft_model=ModelSpec(DEFAULT_MODEL),
                overrides=FORCED,
            ),
            load_timeout_s=600,
        )
        for mode in ("medusa", "eagle"):
            handles[mode] = start_server(
                make_config(**common, speculative_mode=mode, overrides=FORCED), load_timeout_s=600
            )
        yield handles
    finally:
        for handle in handles.values():
            handle.stop()


def _sdk(handle: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.url + "/v1", api_key="none", max_retries=0, timeout=180)


CHATS = [
    "What is the capital of France?",
    "Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
    "Write a Python function that adds two numbers.",
]


def _chat(handle: ServerHandle, prompt: str, stream: bool, schema: bool = False) -> str:
    extra = {}
    if schema:
        extra["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        }
    with _sdk(handle) as sdk:
        kwargs = {"model": MODEL, "temperature": 0, "max_tokens": 64, **extra}
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            r = sdk.chat.completions.create(messages=messages, **kwargs)  # type: ignore[arg-type]
            return f"{r.choices[0].message.content}|{r.choices[0].finish_reason}"
        chunks = sdk.chat.completions.create(messages=messages, stream=True, **kwargs)  # type: ignore[arg-type]
        text, reason = "", None
        for chunk in chunks:
            for c in chunk.choices:
                text += c.delta.content or ""
                reason = c.finish_reason or reason
        return f"{text}|{reason}"


def _completion(handle: ServerHandle, prompt: str, stream: bool) -> str:
    with _sdk(handle) as sdk:
        kwargs = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 48}
        if not stream:
            r = sdk.completions.create(**kwargs)  # type: ignore[call-overload]
            return f"{r.choices[0].text}|{r.choices[0].finish_reason}|{r.usage.completion_tokens}"
        text, reason = "", None
        for chunk in sdk.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return f"{text}|{reason}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_output_is_the_plain_servers(
    servers: dict[str, ServerHandle], mode: str, stream: bool
) -> None:
    plain, drafting = servers["plain"], servers[mode]
    for prompt in CHATS:
        assert _chat(drafting, prompt, stream) == _chat(plain, prompt, stream)
    person = _chat(drafting, "Invent a person: a name and an age.", stream, schema=True)
    assert person == _chat(plain, "Invent a person: a name and an age.", stream, schema=True)
    assert set(json.loads(person.rsplit("|", 1)[0])) == {"name", "age"}
    for prompt in ["The capital of France is", "def fibonacci(n):\n    "]:
        assert _completion(drafting, prompt, stream) == _completion(plain, prompt, stream)


def _metric(text: str, name: str, mode: str) -> float:
    match = re.search(rf'^{name}{{[^}}]*mode="{mode}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


@pytest.mark.parametrize("mode", MODES)
def test_metrics_and_config_report_the_drafts(servers: dict[str, ServerHandle], mode: str) -> None:
    handle = servers[mode]
    names = ["num_drafts", "num_draft_tokens", "num_accepted_tokens"]
    _chat(handle, "Count from one to twenty in words.", stream=False)
    before = httpx.get(handle.url + "/metrics", timeout=30).text
    with _sdk(handle) as sdk:  # no grammar, no early stop: only the drafts decide
        sdk.completions.create(
            model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=64,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    after = httpx.get(handle.url + "/metrics", timeout=30).text
    drafts, drafted, accepted = (
        _metric(after, f"mlctrio_spec_decode_{n}_total", mode)
        - _metric(before, f"mlctrio_spec_decode_{n}_total", mode)
        for n in names
    )
    assert drafts > 0 and 0 < accepted <= drafted
    totals = [_metric(after, f"mlctrio_spec_decode_{n}_total", mode) for n in names]
    mean = _metric(after, "mlctrio_spec_decode_mean_accepted_length", mode)
    assert mean == pytest.approx(totals[2] / totals[0], rel=1e-6)
    if mode == "small_draft":  # the draft is the model itself: nearly every token holds
        assert accepted >= 0.95 * drafted, (accepted, drafted)
    config = httpx.get(handle.url + "/debug/config", timeout=30).json()
    text = json.dumps(config)
    assert f'"speculative_mode": "{mode}"' in text and '"spec_draft_length": 4' in text
