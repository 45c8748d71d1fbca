"""vLLM's extra request fields, sent as real clients send them (the openai SDK's `extra_body`),
and GET /v1/models/{id} for ids holding slashes.

On mock://echo (the prompt is echoed one token per step, then EOS; see mlctrio/testing/echo.py)
the effect of min_tokens and include_stop_str_in_output is exact; the grammar-backed fields
(guided_regex, guided_choice, structured_outputs) need the real engine: demo://tiny, slow.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest

from mlctrio.runtime.chat_template import HFChatTemplate

from .conftest import ServerHandle

MODEL = "mock://echo"
USER = [{"role": "user", "content": "ab"}]

#: What vLLM-minded clients send along, each at its default value: all must be a 200.
VENDOR_DEFAULTS: dict[str, Any] = {
    "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
    "include_stop_str_in_output": False, "ignore_eos": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "use_beam_search": False, "length_penalty": 1.0,
    "stop_token_ids": [], "truncate_prompt_tokens": None, "prompt_logprobs": None,
    "allowed_token_ids": None, "bad_words": [], "logits_processors": None,
    "return_tokens_as_token_ids": False, "return_token_ids": False, "priority": 0,
    "request_id": "client-chosen-id", "vllm_xargs": {}, "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": None, "cache_salt": None, "kv_transfer_params": None,
}  # fmt: skip
CHAT_DEFAULTS: dict[str, Any] = {
    **VENDOR_DEFAULTS, "add_generation_prompt": True, "continue_final_message": False,
    "add_special_tokens": False, "echo": False, "documents": None, "chat_template": None,
    "chat_template_kwargs": {"enable_thinking": False}, "mm_processor_kwargs": {},
}  # fmt: skip
COMPLETION_DEFAULTS: dict[str, Any] = {
    **VENDOR_DEFAULTS, "add_special_tokens": True, "prompt_embeds": None,
}  # fmt: skip


@pytest.fixture
def client(server: ServerHandle) -> Any:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _text(client: Any, prompt: str, **kwargs: Any) -> tuple[str, str | None, int]:
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, **kwargs)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def _streamed_text(client: Any, prompt: str, **kwargs: Any) -> str:
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=32, stream=True, **kwargs
    )
    with stream:
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_vendor_fields_at_their_defaults_are_a_200(client: Any) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=USER, extra_body=CHAT_DEFAULTS)
    assert chat.choices[0].message.content == "ab"
    text, reason, _ = _text(client, "ab", extra_body=COMPLETION_DEFAULTS)
    assert (text, reason) == ("ab", "stop")


def test_min_tokens_bans_eos_until_reached(client: Any) -> None:
    # the echo would stop after "ab"; its EOS is banned until 5 tokens, the filler "~" comes
    assert _text(client, "ab") == ("ab", "stop", 3)
    assert _text(client, "ab", extra_body={"min_tokens": 5}) == ("ab~~~", "stop", 6)
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=32, extra_body={"min_tokens": 4}
    )
    assert chat.choices[0].message.content == "ab~~"
    assert chat.usage.completion_tokens == 5


def test_min_tokens_delays_stop_strings(client: Any) -> None:
    assert _text(client, "hello world", stop=["l"])[:2] == ("he", "stop")
    # the first "l" is token 3: with min_tokens 3 only a stop after token 3 counts
    assert _text(client, "hello world", stop=["l"], extra_body={"min_tokens": 3})[:2] == (
        "hel",
        "stop",
    )
    streamed = _streamed_text(client, "hello world", stop=["l"], extra_body={"min_tokens": 3})
    assert streamed == "hel"


def test_min_tokens_never_holds_back_a_stop_string_completed_once_armed(client: Any) -> None:
    # "lo w" starts at token 4 (min_tokens 4: not armed yet) and completes at token 7: it stops
    text, reason, _ = _text(client, "hello world", stop=["lo w"], extra_body={"min_tokens": 4})
    assert (text, reason) == ("hel", "stop")


def test_include_stop_str_in_output_keeps_the_stop_string(client: Any) -> None:
    body = {"include_stop_str_in_output": True}
    assert _text(client, "hello world", stop=["wor"])[0] == "hello "
    assert _text(client, "hello world", stop=["wor"], extra_body=body)[0] == "hello wor"
    assert _streamed_text(client, "hello world", stop=["wor"], extra_body=body) == "hello wor"
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one. two."}],
        stop=["."],
        extra_body=body,
    )
    assert chat.choices[0].message.content == "one."


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(client: Any) -> None:
    shown = {"skip_special_tokens": False}
    assert _text(client, "ab", extra_body=shown)[0] == "ab"
    kept = _text(client, "ab", extra_body={**shown, "include_stop_str_in_output": True})
    assert kept[0] == "ab<|endoftext|>"
    r = client.completions.create(
        model=MODEL,
        prompt="ab",
        logprobs=0,
        extra_body={**shown, "include_stop_str_in_output": True},
    )
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text  # logprobs spell the text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": "3"}, "min_tokens"),
        ({"min_tokens": 40}, "min_tokens"),  # more than max_tokens (32)
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"length_penalty": 0.5}, "length_penalty"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ({"cache_salt": "s"}, "cache_salt"),
        ({"priority": 1}, "priority"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": 1}}, "structured_outputs.regex"),
        ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern"),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"min_token": 1}, "min_token"),  # a misspelt field stays unknown
    ],
)
def test_wrong_values_are_a_400_naming_the_field(
    client: Any, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=32, extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body


def test_constraints_on_a_model_without_grammar_support_name_the_field(client: Any) -> None:
    for body, param in [
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="ab", extra_body=body)
        assert e.value.body["param"] == param
        assert "constrained output" in e.value.body["message"]


def test_echo_with_logprobs_scores_the_prompt(client: Any) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="abc", echo=True, logprobs=2, max_tokens=2
    )
    [choice] = whole.choices
    assert choice.text == "abcab"  # the prompt, then the echo fake's completion of it
    lp = choice.logprobs
    assert lp.tokens == ["a", "b", "c", "a", "b"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts it
    # Inside the prompt the fake puts all the mass on EOS: the prompt's tokens are unlikely...
    assert all(v < -900 for v in lp.token_logprobs[1:3])
    assert all(list(top) == ["<|endoftext|>", "~"] for top in lp.top_logprobs[1:3])
    # ...and the completion's tokens are certain.
    assert lp.token_logprobs[3:] == [pytest.approx(0.0, abs=1e-3)] * 2
    assert lp.text_offset == [0, 1, 2, 3, 4]
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="abc", echo=True, logprobs=2, max_tokens=2, stream=True
        )
    )
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == "abcab"
    assert streamed[0].text == "abc" and streamed[0].logprobs.tokens == ["a", "b", "c"]
    assert streamed[0].logprobs.token_logprobs == lp.token_logprobs[:3]
    assert [t for c in streamed for t in c.logprobs.tokens] == lp.tokens


def test_prompt_logprobs_agree_with_the_logprobs_of_generation(demo_server: Any) -> None:
    """On the real engine: the logprob echo gives the prompt's last token equals the logprob
    that token had when it was generated from the rest of the prompt (verify vs prefill)."""
    with openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0) as sdk:
        prompt = [5, 17, 99, 3, 42, 8]
        first = sdk.completions.create(
            model="demo://tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=0
        )
        token_logprob = first.choices[0].logprobs.token_logprobs[0]
        ids = demo_server.engine.info.tokenizer.encode(first.choices[0].text)
        assert len(ids) == 1  # the greedy token's text encodes back to that one token
        scored = sdk.completions.create(
            model="demo://tiny", prompt=[*prompt, *ids], max_tokens=1, echo=True, logprobs=1
        )
    lps = scored.choices[0].logprobs
    assert lps.token_logprobs[0] is None
    assert len(lps.token_logprobs) == len(prompt) + len(ids) + 1
    assert lps.token_logprobs[len(prompt)] == pytest.approx(token_logprob, abs=1e-3)


THINKING = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>"
    "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}{% endif %}"
)


def test_chat_template_kwargs_reach_the_jinja_template() -> None:
    template = HFChatTemplate({"default": THINKING})
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages) == "<user>hi<assistant>"
    off = template.render(messages, template_kwargs={"enable_thinking": False})
    assert off == "<user>hi<assistant><no-think>"
    assert template.render(messages, add_generation_prompt=False) == "<user>hi"


@pytest.mark.parametrize("served", ["org/name", "/models/llama-3-8b", "a//b"])
def test_models_route_takes_ids_with_slashes(server_factory: Any, served: str) -> None:
    handle = server_factory(served_model_name=served)
    with openai.OpenAI(base_url=f"{handle.url}/v1", api_key="none", max_retries=0) as c:
        assert c.models.retrieve(served).id == served  # the SDK percent-encodes the slashes
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve(served + "x")
    with httpx.Client(base_url=handle.url) as http:
        raw = http.get(f"/v1/models/{served}")  # the slashes as they are
        assert raw.status_code == 200 and raw.json()["id"] == served
        missing = http.get(f"/v1/models/{served}/")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# ---- the grammar-backed fields on the real engine -------------------------------------------


@pytest.fixture
def demo_client(demo_server: ServerHandle) -> Any:
    with openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _demo_texts(client: Any, body: dict[str, Any], *, chat: bool) -> list[str]:
    if chat:
        r = client.chat.completions.create(
            model="demo://tiny", messages=USER, n=8, seed=3, max_tokens=48, extra_body=body
        )
        assert all(c.finish_reason == "stop" for c in r.choices)
        return [c.message.content for c in r.choices]
    r = client.completions.create(
        model="demo://tiny", prompt="x", n=8, seed=3, max_tokens=48, extra_body=body
    )
    assert all(c.finish_reason == "stop" for c in r.choices)
    return [c.text for c in r.choices]


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False])
def test_guided_choice_picks_one_of_the_strings(demo_client: Any, chat: bool) -> None:
    options = ["red", "green", "blue ✓"]
    for body in ({"guided_choice": options}, {"structured_outputs": {"choice": options}}):
        texts = _demo_texts(demo_client, body, chat=chat)
        assert set(texts) <= set(options), texts


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False])
def test_guided_regex_output_matches(demo_client: Any, chat: bool) -> None:
    pattern = r"[a-c]{2,5}/[0-9]{1,3}"
    for body in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        for text in _demo_texts(demo_client, body, chat=chat):
            assert re.fullmatch(pattern, text), text


@pytest.mark.slow
def test_guided_grammar_and_bad_patterns(demo_client: Any) -> None:
    grammar = 'start: "yes" | "no" | "n=" /[0-9]/'
    for text in _demo_texts(demo_client, {"structured_outputs": {"grammar": grammar}}, chat=True):
        assert re.fullmatch(r"yes|no|n=[0-9]", text), text
    for body, param in [
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            demo_client.chat.completions.create(model="demo://tiny", messages=USER, extra_body=body)
        assert e.value.body["param"] == param, e.value.body
