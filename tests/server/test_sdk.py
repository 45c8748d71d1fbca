"""The official openai SDK against a real server running the echo fake engine.

mock://echo's chat template joins the message contents with newlines, and the fake model echoes
the prompt back one token (byte) per step, then ends with EOS: so the expected output of every
request is known exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .conftest import ServerHandle

MODEL = "mock://echo"


@pytest.fixture
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client  # closed here, not by a finalizer during some later test


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_echo_non_streaming(client: openai.OpenAI, server: ServerHandle) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello, wörld ☃!"}]
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello, wörld ☃!"
    assert choice.finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.usage is not None
    # One byte token per UTF-8 byte in the echo, plus the EOS token that ended it.
    assert reply.usage.completion_tokens == len("Hello, wörld ☃!".encode()) + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    server.wait_quiescent()


def test_chat_streaming_accumulates_to_the_same_text(client: openai.OpenAI) -> None:
    text = "Streaming 日本語 and emoji 🎉 works"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert all(f is None for f in finishes[:-1])


def test_max_tokens_gives_length_with_exactly_that_many_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "abcdefghij"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "abcd"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "abcdefghij"}],
        max_completion_tokens=3,
    )
    assert reply.choices[0].message.content == "abc"
    assert reply.choices[0].finish_reason == "length"


def test_stop_strings(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two STOP three"}], stop=["STOP"]
    )
    assert reply.choices[0].message.content == "one two "
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two STOP three"}],
        stop="STOP",
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "one two "


def test_n_greater_than_one(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "twins"}], n=3
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all(c.message.content == "twins" for c in reply.choices)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3 * (len("twins") + 1)
    single = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "twins"}]
    )
    assert single.usage is not None
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # prompt counted once
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "twins"}], n=2, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "twins", 1: "twins"}


def test_seed_gives_the_same_output_twice(client: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "seeded sampling"}],
        temperature=1.3,
        top_p=0.9,
        seed=1234,
    )
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].message.content == second.choices[0].message.content


def test_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "usage please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len("usage please") + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="complete me", max_tokens=100)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "complete me"
    assert reply.choices[0].finish_reason == "stop"
    short = client.completions.create(model=MODEL, prompt="complete me")  # default 16
    assert short.choices[0].text == "complete me"
    batch = client.completions.create(model=MODEL, prompt=["ab", "cde"], n=2, max_tokens=10)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        "ab",
        "ab",
        "cde",
        "cde",
    ]
    echo = client.completions.create(model=MODEL, prompt="xy", echo=True, max_tokens=1)
    assert echo.choices[0].text == "xyx"
    stream = client.completions.create(model=MODEL, prompt="stream me", stream=True, max_tokens=5)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "strea"


def test_completion_with_token_ids(client: openai.OpenAI) -> None:
    ids = list(b"hi")
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=10)
    assert reply.choices[0].text == "hi"


def test_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "lp"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert [t.token for t in content] == ["l", "p"]
    for item in content:
        assert item.logprob <= 0.0
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (
            lambda c: c.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            ),
            openai.NotFoundError,
        ),
        (lambda c: c.chat.completions.create(model=MODEL, messages=[]), openai.BadRequestError),
        (
            lambda c: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5
            ),
            openai.BadRequestError,
        ),
        (
            lambda c: c.completions.create(model=MODEL, prompt="x", suffix="y"),
            openai.BadRequestError,
        ),
        (
            lambda c: c.completions.create(model=MODEL, prompt="x", best_of=3, n=1),
            openai.BadRequestError,
        ),
        (
            lambda c: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * 5000}]
            ),
            openai.BadRequestError,
        ),
    ],
)
def test_errors_surface_as_sdk_exceptions(client: openai.OpenAI, call, exc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc) as info:
        call(client)
    body = info.value.body
    assert isinstance(body, dict)
    assert set(body) >= {"message", "type", "param", "code"}


def test_context_length_error_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 5000}], stream=True
        )
    assert info.value.code == "context_length_exceeded"


def test_auth_error_is_sdk_authentication_error(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(api_keys=("sk-right",))
    bad = openai.OpenAI(base_url=handle.url + "/v1", api_key="sk-wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=handle.url + "/v1", api_key="sk-right", max_retries=0)
    with good:
        assert good.models.list().data[0].id == MODEL


def test_queue_full_is_503_with_retry_after(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(
        model="mock://echo?delay_ms=50&max_num_sequence=1", max_queued_requests=1
    )
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)
    with client, handle.client() as http:
        # Two long streams: one runs, one waits in the queue; the third is refused.
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "a" * 200}],
                "stream": True,
            },
        ) as first:
            # Keep the iterators: one dropped after next() is closed at once, which closes the
            # response, and the server rightly aborts a request whose client went away.
            first_chunks = first.iter_bytes()
            next(first_chunks)
            # Running, not queued: it has had an output (else the second would be refused).
            handle.wait_until(
                lambda: handle.engine.num_in_flight == 1 and handle.engine.num_queued == 0
            )
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "b" * 200}],
                    "stream": True,
                },
            ) as second:
                assert second.status_code == 200
                second_chunks = second.iter_bytes()
                next(second_chunks)
                handle.wait_until(lambda: handle.engine.num_queued == 1)
                with pytest.raises(openai.InternalServerError) as info:
                    client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "c"}]
                    )
                assert info.value.status_code == 503
                assert info.value.response.headers["retry-after"] == "1"
                assert info.value.code == "queue_full"
                # Both streams were alive all along: the first is still generating.
                assert b"data:" in next(first_chunks)
                assert handle.engine.num_in_flight == 2
    handle.wait_quiescent()
