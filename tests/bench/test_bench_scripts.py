"""bench/serve.py against a real `mlctrio serve mock://echo` subprocess, with tiny settings.

These check that the load generator counts and summarises correctly; they time nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from bench._common import open_mlctrio_server
from bench.http_overhead import measure_engine_direct
from bench.serve import LoadConfig, LoadResult, build_prompts, main, percentile, run_load

# 1 ms per engine step: fast, yet every token is its own step (and its own SSE event).
MODEL = "mock://echo?delay_ms=1"


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with open_mlctrio_server(MODEL, ["--log-level", "warning"]) as url:
        yield url


def _assert_consistent(result: LoadResult) -> None:
    for metric in ("ttft", "tpot", "itl", "e2e"):
        s = result.summary(metric)
        assert s.count > 0
        assert s.p50 <= s.p90 <= s.p99, metric
    for record in result.ok:
        assert record.ttft_s is not None
        assert 0 < record.ttft_s <= record.e2e_s
    assert result.duration_s > 0
    assert not result.truncated


async def test_run_load_counts_every_token(server_url: str) -> None:
    config = LoadConfig(
        base_url=server_url + "/v1",  # either form of the base URL is accepted
        prompt_tokens=24,
        output_tokens=16,
        num_requests=6,
        concurrency=3,
        warmup=1,
    )
    result = await run_load(config)
    assert result.model == "mock://echo"  # the first of GET /v1/models
    assert result.num_failed == 0
    assert len(result.records) == 6
    assert result.num_output_tokens == 6 * 16
    for record in result.records:
        assert record.usage_reported
        assert record.output_tokens == 16
        assert record.prompt_tokens == 24  # /tokenize + /detokenize cut it exactly
        assert len(record.itl_s) == 15  # the echo streams one token per event
    assert result.output_throughput == pytest.approx(96 / result.duration_s)
    _assert_consistent(result)


async def test_token_id_prompts_on_completions(server_url: str) -> None:
    config = LoadConfig(
        base_url=server_url,
        endpoint="completions",
        token_ids=True,
        prompt_tokens=20,
        output_tokens=8,
        num_requests=4,
        concurrency=2,
    )
    result = await run_load(config)
    assert result.num_failed == 0
    assert result.num_output_tokens == 4 * 8
    assert result.mean_prompt_tokens == 20
    _assert_consistent(result)


async def test_duration_stops_the_loop_early(server_url: str) -> None:
    config = LoadConfig(
        base_url=server_url,
        prompt_tokens=64,
        output_tokens=48,  # ~50 ms per request at 1 ms per step
        num_requests=40,
        concurrency=2,
        duration_s=0.2,
    )
    result = await run_load(config)
    assert result.num_failed == 0
    assert 2 <= len(result.records) < 40
    assert result.num_output_tokens == len(result.records) * 48


async def test_errors_are_recorded_not_raised(server_url: str) -> None:
    config = LoadConfig(base_url=server_url, model="no-such-model", num_requests=2, prompt_tokens=8)
    result = await run_load(config)
    assert result.num_failed == 2
    assert all(r.error and r.error.startswith("HTTP 404") for r in result.records)
    assert math.isnan(result.summary("ttft").p50)


def test_cli_sweep_writes_json_and_plot(server_url: str, tmp_path: Path) -> None:
    json_out, plot_out = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        [
            "--base-url", server_url, "--concurrency", "1,2", "--num-requests", "4",
            "--prompt-tokens", "16", "--output-tokens", "8",
            "--json-out", str(json_out), "--plot-out", str(plot_out),
        ]
    )  # fmt: skip
    assert rc == 0
    runs = json.loads(json_out.read_text())["runs"]
    assert [run["config"]["concurrency"] for run in runs] == [1, 2]
    for run in runs:
        assert run["num_ok"] == 4
        assert run["num_output_tokens"] == 4 * 8
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            s = run[metric]
            assert s["p50"] <= s["p90"] <= s["p99"]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert plot_out.exists() == has_matplotlib


def _llama_cpp_tokenizer(request: httpx.Request) -> httpx.Response:
    """llama.cpp's routes: one token per character; unknown bodies give an empty list."""
    body = json.loads(request.content)
    if request.url.path == "/tokenize":
        return httpx.Response(200, json={"tokens": [ord(c) for c in body.get("content", "")]})
    if request.url.path == "/detokenize":
        return httpx.Response(200, json={"content": "".join(map(chr, body["tokens"]))})
    return httpx.Response(404)


async def test_prompts_from_llama_cpp_routes() -> None:
    transport = httpx.MockTransport(_llama_cpp_tokenizer)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        config = LoadConfig(prompt_tokens=30)
        prompts = await build_prompts(client, "m", config, 5)
        ids = await build_prompts(
            client, "m", LoadConfig(prompt_tokens=30, endpoint="completions", token_ids=True), 2
        )
    assert [len(p) for p in prompts] == [30] * 5
    assert len(set(prompts)) == 5  # every prompt differs: no prefix-cache hits
    assert [len(p) for p in ids] == [30, 30]
    assert all(isinstance(t, int) for t in ids[0])


async def test_prompts_without_tokenizer_routes(capsys: pytest.CaptureFixture[str]) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(404))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        prompts = await build_prompts(client, "m", LoadConfig(prompt_tokens=12), 3)
    assert [len(str(p).split()) for p in prompts] == [12] * 3  # one word per token
    assert "no /tokenize route" in capsys.readouterr().err


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_engine_direct_measurement_runs() -> None:
    direct = measure_engine_direct(num_streams=4, prompt_tokens=16, output_tokens=8, num_requests=8)
    assert direct.num_output_tokens == 8 * 8
    assert direct.num_steps >= 2 * 8  # two waves of 8 tokens
    assert direct.mean_tpot_s > 0


def test_decode_weight_bytes_leave_out_an_untied_embedding() -> None:
    from bench.runtime import decode_weight_bytes
    from mlctrio.models.llama import TINY

    sizes = [
        ("model.embed_tokens.weight", 1000),
        ("model.layers.0.mlp.down_proj.weight", 30),
        ("lm_head.weight", 1000),
    ]
    assert decode_weight_bytes(sizes, TINY) == 1030  # the table is read one row at a time
    tied = attrs.evolve(TINY, tie_word_embeddings=True)
    assert decode_weight_bytes(sizes[:2], tied) == 1030  # tied: the table is the output head
