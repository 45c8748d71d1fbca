"""A sliding window that releases KV pages, on the real default model (docs/discussion/0011).

SmolLM2-135M-Instruct served with mlc_llm's `--overrides sliding_window_size=64` (every layer
then slides) and a KV cache of 512 tokens: a 53-token prompt plus 600 generated tokens cannot be
held whole, so the request can only finish because its sequence keeps no more than the window.
While it streams, GET /get_load (what sglang-router reads) shows the tokens it holds: the
window plus a page.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from mlctrio.cli import DEFAULT_MODEL
from mlctrio.config import EngineOverrides, default_served_name

from .conftest import ServerHandle, make_config, start_server

pytestmark = pytest.mark.slow
MODEL = default_served_name(DEFAULT_MODEL)
WINDOW, PAGE, TOKENS = 64, 16, 600
OVERRIDES = f"sliding_window_size={WINDOW};max_total_seq_length=512;prefill_chunk_size=256"


@pytest.fixture(scope="module")
def sliding(smollm2_gguf: object) -> Iterator[ServerHandle]:
    config = make_config(model=DEFAULT_MODEL, overrides=EngineOverrides.parse(OVERRIDES))
    handle = start_server(config, load_timeout_s=600)
    yield handle
    handle.stop()


def _tokens_held(http: httpx.Client) -> int:
    """KV tokens requests hold (pages x page size), as GET /get_load tells sglang-router."""
    reply = http.get("/get_load").json()
    return int((reply[0] if isinstance(reply, list) else reply)["num_tokens"])


def test_a_generation_longer_than_the_cache_holds_one_window(sliding: ServerHandle) -> None:
    prompt = "Write a long story about a lighthouse keeper and the sea. " * 4
    held = []
    with (
        openai.OpenAI(base_url=sliding.url + "/v1", api_key="x", max_retries=0) as sdk,
        httpx.Client(base_url=sliding.url, timeout=30) as http,
    ):
        stream = sdk.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage = "", None
        for i, chunk in enumerate(stream):
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
            if i in (100, 300, 500):
                held.append(_tokens_held(http))
    assert usage is not None and usage.completion_tokens == TOKENS
    assert usage.prompt_tokens + TOKENS > 512  # more than the whole cache holds
    assert len(text.split()) > 100
    # the window and the page it may straddle, at every point sampled
    assert held and all(0 < n <= WINDOW + PAGE for n in held), held
