"""The real Gemma 3 270M (Q4_K_M GGUF, `embedded://gemma-3-270m`) served end to end.

Gemma 3 is the family with the most switches (sliding and global layers with their own RoPE bases,
q/k norms, sandwich norms, GeGLU, a scaled embedding) and a 262k SentencePiece vocabulary. The file
is the pre-trained model (no chat template of its own: the Gemma turn format is used).

The reference is llama.cpp's llama-server on the same file (tests/data/greedy_golden_gemma3.json,
tests/data/make_greedy_golden.py): its prompt token ids and 16 greedy tokens per prompt. Token ids
must be identical. Greedy continuations agree only "for most prompts": mlctrio has no kernel for
Q4_K or Q6_K and stores them as q4_1 (nibbles kept, scales rounded to f16) and q8_0 (re-quantized),
so the weights differ slightly from llama.cpp's (on an F32 copy of the file, made by llama-quantize,
all 16 prompts agree on all 16 tokens: see docs/discussion/0010). A divergence counts as
explained when llama.cpp's own top-2 gap at that step is under NEAR_TIE nats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import ServerHandle, make_config, start_server

pytestmark = pytest.mark.slow
MODEL = "embedded://gemma-3-270m"
GOLDEN = json.loads(
    (Path(__file__).parents[1] / "data" / "greedy_golden_gemma3.json").read_text(encoding="utf-8")
)
NEAR_TIE = 0.3  # nats: where slightly different weights may pick the other token
MIN_AGREE = 8  # tokens that must agree, unless a near-tie comes first


@pytest.fixture(scope="module")
def gemma(gemma3_gguf: Path) -> Iterator[ServerHandle]:
    handle = start_server(make_config(model=MODEL), load_timeout_s=900)
    yield handle
    handle.stop()


@pytest.fixture
def http(gemma: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gemma.url, timeout=120) as client:
        yield client


def _served_name(http: httpx.Client) -> str:
    return str(http.get("/v1/models").json()["data"][0]["id"])


def test_prompt_token_ids_equal_llama_server(http: httpx.Client) -> None:
    name = _served_name(http)
    for case in GOLDEN["cases"]:
        reply = http.post("/tokenize", json={"model": name, "prompt": case["prompt"]}).json()
        assert reply["tokens"] == case["prompt_ids"], case["prompt"]


def _agreement(http: httpx.Client, name: str, case: dict) -> tuple[int, str]:
    """How many of llama-server's greedy tokens mlctrio's continuation starts with."""
    body = {"model": name, "prompt": case["prompt_ids"], "max_tokens": len(case["ids"]),
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    agree = 0
    for n in range(1, len(case["ids"]) + 1):
        detok = {"model": name, "tokens": case["ids"][:n]}
        expected = http.post("/detokenize", json=detok).json()["prompt"]
        if not text.startswith(expected):
            break
        agree = n
    return agree, text


def test_greedy_continuations_agree_with_llama_server_for_most_prompts(
    http: httpx.Client,
) -> None:
    name = _served_name(http)
    report = []
    for case in GOLDEN["cases"]:
        agree, text = _agreement(http, name, case)
        gap = case["top2_gap"][agree] if agree < len(case["ids"]) else None
        report.append((case["prompt"], agree, gap, text))
    unexplained = [r for r in report if r[1] < MIN_AGREE and (r[2] is None or r[2] >= NEAR_TIE)]
    full = [r for r in report if r[1] == 16]
    # Measured: 11 of 16 agree on all 16 tokens; every divergence is at a step where llama.cpp's
    # own top two are within 0.25 nats (with Q4_K re-quantized instead of kept, 5 of 16 agreed
    # and "The quick brown fox" diverged at its first token by 1.8 nats).
    assert len(full) >= 9, report
    assert unexplained == [], unexplained


def test_chat_through_the_sdk_in_gemma_turns(gemma: ServerHandle, http: httpx.Client) -> None:
    name = _served_name(http)
    with openai.OpenAI(base_url=gemma.url + "/v1", api_key="none", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model=name,
            temperature=0,
            max_tokens=24,
            messages=[{"role": "user", "content": "Name a primary colour."}],
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == len(
            http.post(
                "/tokenize",
                json={"model": name, "prompt": "<bos><start_of_turn>user\nName a primary colour."
                      "<end_of_turn>\n<start_of_turn>model\n"},
            ).json()["tokens"]
        )  # fmt: skip
        text = reply.choices[0].message.content or ""
        assert text and "<start_of_turn>" not in text and "<end_of_turn>" not in text
        chunks = sdk.chat.completions.create(
            model=name,
            temperature=0,
            max_tokens=24,
            stream=True,
            messages=[{"role": "user", "content": "Name a primary colour."}],
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text


def test_a_prompt_longer_than_the_sliding_window(http: httpx.Client) -> None:
    """Over 512 tokens of prompt (the window is 512), served again from the prefix cache and
    extended (a fork mid-page of the cached prompt): the same reply, no error. Exactness of
    sliding layers across forks is tests/models/test_families.py's, against transformers."""
    name = _served_name(http)
    words = " ".join(f"item{i}" for i in range(300))
    prompt = f"Here is a list: {words}. The list has"
    body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    first = http.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens"] > 512
    again = http.post("/v1/completions", json=body).json()  # served from the prefix cache
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    longer = http.post("/v1/completions", json={**body, "prompt": prompt + " exactly"}).json()
    assert longer["choices"][0]["text"]  # a fork mid-page of the cached prompt
