"""POST /v1/embeddings through the official SDK.

On mock://echo the "hidden state" of a token is cos(id * k), k = 1..8 (testing/echo.py), so every
vector is known in advance: the mean over the prompt's byte tokens, L2-normalised. On demo://tiny
(the real TVM engine) a batched vector must equal the vector of the same input sent alone.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from mlctrio.testing.echo import HIDDEN_SIZE, ByteTokenizer

from .conftest import ServerHandle

M = "mock://echo"


def _expected(ids: list[int]) -> np.ndarray:
    feats = np.cos(np.outer(np.asarray(ids, np.float64), np.arange(1, HIDDEN_SIZE + 1)))
    mean = feats.mean(axis=0)
    return mean / np.linalg.norm(mean)


def _ids(text: str) -> list[int]:
    return ByteTokenizer().encode(text, add_special_tokens=True)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


def test_single_text_is_the_normalised_mean_of_its_token_states(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default and decodes it: this is the base64 path.
    result = client.embeddings.create(model="mock://echo", input="héllo, world")
    assert result.object == "list" and result.model == "mock://echo"
    [item] = result.data
    assert item.index == 0 and item.object == "embedding"
    np.testing.assert_allclose(item.embedding, _expected(_ids("héllo, world")), atol=1e-6)
    assert result.usage.prompt_tokens == len(_ids("héllo, world"))
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_batch_vectors_equal_single_vectors_and_keep_order(client: openai.OpenAI) -> None:
    texts = [f"input number {i} " + "x" * (i * 7) for i in range(70)]  # more than one wave
    batch = client.embeddings.create(model="mock://echo", input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(texts)))
    for text, item in zip(texts, batch.data, strict=True):
        single = client.embeddings.create(model="mock://echo", input=text).data[0].embedding
        assert item.embedding == pytest.approx(single, abs=1e-7)
        np.testing.assert_allclose(item.embedding, _expected(_ids(text)), atol=1e-6)
    assert batch.usage.prompt_tokens == sum(len(_ids(t)) for t in texts)


def test_token_id_inputs_and_base64_on_the_wire(server: ServerHandle) -> None:
    with httpx.Client(base_url=server.url) as http:
        one = http.post(
            "/v1/embeddings", json={"model": M, "input": [104, 105], "encoding_format": "base64"}
        )
        many = http.post("/v1/embeddings", json={"model": M, "input": [[104, 105], [33]]})
    assert one.status_code == 200 and many.status_code == 200
    raw = one.json()["data"][0]["embedding"]
    assert isinstance(raw, str)
    vector = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    np.testing.assert_allclose(vector, _expected([104, 105]), atol=1e-6)
    data = many.json()["data"]
    np.testing.assert_allclose(data[0]["embedding"], vector, atol=1e-6)
    np.testing.assert_allclose(data[1]["embedding"], _expected([33]), atol=1e-6)
    assert many.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_vllm_options_truncate_and_unnormalised(server: ServerHandle) -> None:
    with httpx.Client(base_url=server.url) as http:
        cut = http.post(
            "/v1/embeddings",
            json={"model": M, "input": [1, 2, 3, 104, 105], "truncate_prompt_tokens": 2},
        )
        raw = http.post(
            "/v1/embeddings", json={"model": M, "input": [104, 105], "normalize": False}
        )
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 2
    np.testing.assert_allclose(cut.json()["data"][0]["embedding"], _expected([104, 105]), 1e-6)
    mean = np.cos(np.outer([104.0, 105.0], np.arange(1, HIDDEN_SIZE + 1))).mean(axis=0)
    np.testing.assert_allclose(raw.json()["data"][0]["embedding"], mean, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input.1"),
        ({"input": [[]]}, 400, "input.0"),
        ({"input": [1, 999_999]}, 400, "input"),
        ({"input": "x", "dimensions": 4}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "nope"}, 404, "model"),
        ({"input": "x" * 10_000}, 400, "input"),  # past the 4096-token window
        ({"input": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
        ({"input": "x", "model": None}, 400, "model"),  # required, as in OpenAI's schema
    ],
)
def test_bad_requests_get_openai_errors(
    server: ServerHandle, body: dict[str, object], status: int, param: str
) -> None:
    with httpx.Client(base_url=server.url) as http:
        response = http.post("/v1/embeddings", json={"model": M, **body})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_dimensions_equal_to_the_hidden_size_is_accepted(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="mock://echo", input="abc", dimensions=HIDDEN_SIZE)
    assert len(result.data[0].embedding) == HIDDEN_SIZE


def test_real_engine_batched_vectors_equal_single_ones(demo_server: ServerHandle) -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, 200, int(n)).tolist() for n in rng.integers(20, 300, 12)]
    with openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0) as sdk:
        batch = sdk.embeddings.create(model="demo://tiny", input=inputs)
        singles = [sdk.embeddings.create(model="demo://tiny", input=i).data[0] for i in inputs]
    for got, single in zip(batch.data, singles, strict=True):
        assert np.linalg.norm(got.embedding) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(got.embedding, single.embedding, atol=2e-5)
    # Different inputs, different vectors (the engine did not hand one row to everyone).
    assert not np.allclose(batch.data[0].embedding, batch.data[1].embedding, atol=1e-3)
    assert batch.usage.prompt_tokens == sum(len(i) for i in inputs)
    assert demo_server.core_stats().kv_cache_usage_ratio == 0.0  # nothing left holding pages
