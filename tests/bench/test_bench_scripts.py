"""bench/serve.py against a real `mlctrio serve mock://echo` subprocess, with tiny settings.

These check that the load generator counts and summarises correctly; they time nothing.
"""

from __future__ import annotations

import argparse
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
    from mlctrio.models.llama_config import TINY

    sizes = [
        ("model.embed_tokens.weight", 1000),
        ("model.layers.0.mlp.down_proj.weight", 30),
        ("lm_head.weight", 1000),
    ]
    assert decode_weight_bytes(sizes, TINY) == 1030  # the table is read one row at a time
    tied = attrs.evolve(TINY, tie_word_embeddings=True)
    assert decode_weight_bytes(sizes[:2], tied) == 1030  # tied: the table is the output head


# -- argument parsing and pure helpers of compare.py, gguf_parity.py, llama_cpp.py (no servers) --


def test_compare_gguf_arguments(tmp_path: Path) -> None:
    from bench import compare

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    args = compare.parse_args(["--gguf", str(gguf), "--concurrency", "1,4,16"])
    assert args.gguf == gguf and args.gguf_type is None and args.activations is None
    assert compare.llama_parallel(args) == 16  # one slot per concurrent request
    assert compare.resolve_gguf(args) == gguf  # as is: no llama-quantize without --gguf-type
    stem, title = compare.run_names(args, ["mlctrio[Q4_1]", "llama.cpp[Q4_1]"])
    assert stem == "compare-SmolLM2-135M-Instruct.Q4_1-as-is-default"
    assert title.startswith("SmolLM2-135M-Instruct.Q4_1: mlctrio[Q4_1] vs llama.cpp[Q4_1], 2 ")

    args = compare.parse_args(
        ["--gguf", str(gguf), "--gguf-type", "Q8_0", "--activations", "q8", "--parallel", "2"]
    )
    assert compare.llama_parallel(args) == 2
    stem, title = compare.run_names(args, ["a", "b"])
    assert stem == "compare-SmolLM2-135M-Instruct.Q4_1-Q8_0-q8"
    assert "-> Q8_0" in title

    demo = compare.parse_args(["--concurrency", "1,32"])
    assert demo.gguf is None and compare.llama_parallel(demo) == 8  # the demo default is kept
    assert compare.resolve_gguf(demo) is None
    assert compare.run_names(demo, ["a"])[0] == "compare-small-f32"


@pytest.mark.parametrize("flag", [["--gguf-type", "F32"], ["--activations", "q8"]])
def test_compare_gguf_options_need_gguf(flag: list[str]) -> None:
    from bench import compare

    with pytest.raises(SystemExit):
        compare.parse_args(flag)


def test_gguf_label() -> None:
    from bench.compare import gguf_label

    assert gguf_label(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "Q4_1"
    assert gguf_label(Path("x-b179c9523d0e.F32.gguf")) == "F32"
    assert gguf_label(Path("model.gguf")) == "gguf"
    assert gguf_label(Path("v1.5-model.gguf")) == "gguf"


def test_mlctrio_serve_cmd() -> None:
    from bench._common import mlctrio_serve_cmd

    cmd = mlctrio_serve_cmd(Path("/m/x.gguf"), "{port}", ["--activations", "q8"])
    assert cmd[1:5] == ["-m", "mlctrio", "serve", "/m/x.gguf"]
    assert cmd[cmd.index("--port") + 1] == "{port}"
    assert cmd[cmd.index("--mode") + 1] == "server"
    assert cmd[-2:] == ["--activations", "q8"]


def test_gguf_parity_arguments(tmp_path: Path) -> None:
    from bench.gguf_parity import parse_args

    args = parse_args([str(tmp_path / "m.gguf")])
    assert args.mlctrio_extra == [] and args.tokens == 32 and args.gguf_type is None
    args = parse_args(
        ["m.gguf", "--type", "F32", "--activations", "q8", "--mlctrio-args", "--max-num-seqs 2"]
    )
    assert args.gguf_type == "F32"
    assert args.mlctrio_extra == ["--activations", "q8", "--max-num-seqs", "2"]


def test_tokenization_check() -> None:
    from bench.gguf_parity import check_tokenization

    checks = check_tokenization(
        ["ab", "abc", "xy"],
        lambda t: [ord(c) for c in t],
        lambda t: [ord(c) for c in t.replace("y", "z")],
    )
    assert [c.ok for c in checks] == [True, True, False]
    assert checks[2].first_difference == 1
    assert check_tokenization(["a"], lambda t: [0], lambda t: [1])[0].first_difference == 0
    assert check_tokenization(["a"], lambda t: [0], lambda t: [0, 1])[0].first_difference == 1


def test_divergence_verdicts() -> None:
    from bench.gguf_parity import divergence

    tops = [{"a": -0.1, "b": -2.0}, {"c": -0.69, "d": -0.70}]
    assert divergence(["a", "c"], tops, ["a", "c"], tops, 0.05) == (None, None, None, "identical")
    # step 1: mlctrio picks c, llama.cpp d; 0.01 nats apart in both: a near-tie
    their = [{"a": -0.1, "b": -2.0}, {"d": -0.68, "c": -0.70}]
    step, ours_gap, theirs_gap, verdict = divergence(["a", "c"], tops, ["a", "d"], their, 0.05)
    assert (step, verdict) == (1, "near-tie")
    assert ours_gap == pytest.approx(0.01) and theirs_gap == pytest.approx(0.02)
    # the same divergence with a real gap on one side
    assert divergence(["a", "c"], tops, ["a", "d"], their, 0.015)[3] == "differs"
    # the other's choice is not in a server's top list: its gap is unknown, not a tie
    assert divergence(["b"], [{"b": -0.5}], ["a"], [{"a": -0.1, "b": -0.2}], 1.0) == (
        0,
        None,
        pytest.approx(0.1),
        "differs",
    )
    assert divergence(["a"], tops, ["a", "c"], tops, 0.05) == (1, None, None, "differs")


def test_greedy_rows_and_token_texts() -> None:
    from bench.gguf_parity import GreedyCheck, greedy_rows, token_texts

    vocab = {0: b"a", 1: b" b", 2: b"\xe2", 3: "é".encode()}
    assert token_texts(vocab.__getitem__, 4) == ["a", " b", "\ufffd", "é"]
    same = GreedyCheck("p", 3, ["a"], ["a"])
    tie = GreedyCheck("q" * 50, 4, ["a", "b"], ["a", "c"], 1, 0.01, None, "differs")
    rows = greedy_rows([same, tie])
    assert rows[0]["result"] == "identical" and rows[0]["first diff"] == "-"
    assert rows[1]["mlctrio / llama.cpp token"] == "'b' / 'c'"
    assert rows[1]["mlctrio gap"] == "0.0100" and rows[1]["llama.cpp gap"] == "absent"
    assert str(rows[1]["prompt"]).endswith("...")


def _fake_build_tree(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[list[str]]:
    """A cache with llama-server built (marker from before llama-quantize), cmake recorded."""
    from bench import llama_cpp

    monkeypatch.setenv("MLCTRIO_CACHE_DIR", str(root))
    monkeypatch.delenv("MLCTRIO_LLAMA_SERVER", raising=False)
    monkeypatch.delenv("MLCTRIO_LLAMA_QUANTIZE", raising=False)
    build = llama_cpp.cache_dir() / "build"
    (build / "bin").mkdir(parents=True)
    (build / "CMakeCache.txt").write_text("")
    (build / "bin" / "llama-server").write_text("")
    (llama_cpp.cache_dir() / "build.ok").write_text(
        json.dumps({"flags": list(llama_cpp.CMAKE_FLAGS), "targets": ["llama-server"]})
    )
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: object, *, cwd: object = None) -> None:
        calls.append(list(cmd))
        if "--target" in cmd:
            for target in cmd[cmd.index("--target") + 1 :]:
                (build / "bin" / target).write_text("")

    monkeypatch.setattr(llama_cpp, "_run_logged", fake_run)
    return calls


def test_a_missing_llama_cpp_target_is_built_incrementally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import llama_cpp

    calls = _fake_build_tree(monkeypatch, tmp_path)
    assert llama_cpp.find_llama_server() is not None
    assert llama_cpp.find_llama_binary("llama-quantize") is None  # not in the marker
    quantize = llama_cpp.ensure_llama_binary("llama-quantize")
    assert quantize.name == "llama-quantize"
    (cmd,) = calls  # no configure, no llama-server rebuild: only the missing target
    assert cmd[:2] == ["cmake", "--build"] and cmd[cmd.index("--target") + 1 :] == [
        "llama-quantize"
    ]
    marker = json.loads((llama_cpp.cache_dir() / "build.ok").read_text())
    assert marker["targets"] == ["llama-server", "llama-quantize"]
    assert llama_cpp.find_llama_binary("llama-quantize") == quantize
    assert llama_cpp.ensure_llama_binary("llama-quantize") == quantize and len(calls) == 1


def test_other_flags_rebuild_every_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import llama_cpp

    calls = _fake_build_tree(monkeypatch, tmp_path)
    (llama_cpp.cache_dir() / "src").mkdir()
    (llama_cpp.cache_dir() / "src" / "CMakeLists.txt").write_text("")
    (llama_cpp.cache_dir() / "build.ok").write_text(json.dumps({"flags": ["-DOLD=1"]}))
    assert llama_cpp.find_llama_server() is None
    llama_cpp.ensure_llama_binary("llama-quantize")
    configure, build = calls
    assert configure[:2] == ["cmake", "-S"]
    assert build[build.index("--target") + 1 :] == list(llama_cpp.BUILD_TARGETS)


def test_quantized_gguf_is_cached_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import llama_cpp

    monkeypatch.setenv("MLCTRIO_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "calls"
    fake = tmp_path / "llama-quantize"  # copies SRC to DEST and notes its arguments
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp "$2" "$3"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("MLCTRIO_LLAMA_QUANTIZE", str(fake))
    src = tmp_path / "m.Q4_1.gguf"
    src.write_bytes(b"weights")
    out = llama_cpp.cached_quantized_gguf(src, "q8_0")
    sha = llama_cpp.file_sha256(src)
    assert out == tmp_path / "cache" / "gguf" / f"m.Q4_1-{sha[:12]}.Q8_0.gguf"
    assert out.read_bytes() == b"weights"
    assert llama_cpp.cached_quantized_gguf(src, "Q8_0") == out  # cached: not run again
    (args,) = log.read_text().splitlines()
    assert args.startswith(f"--allow-requantize {src} ") and args.endswith(" Q8_0 2")
    src.write_bytes(b"other weights")  # new content, new file
    assert llama_cpp.cached_quantized_gguf(src, "Q8_0") != out
    assert not list((tmp_path / "cache" / "gguf").glob("*.tmp*"))


def test_failed_quantize_leaves_no_file(tmp_path: Path) -> None:
    from bench import llama_cpp

    fake = tmp_path / "llama-quantize"
    fake.write_text('#!/bin/sh\necho "unknown type" >&2\nexit 1\n')
    fake.chmod(0o755)
    dest = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="unknown type"):
        llama_cpp.quantize_gguf(tmp_path / "in.gguf", dest, "Q9", binary=fake)
    assert list(tmp_path.iterdir()) == [fake]


def test_max_logprob_diff() -> None:
    from bench.gguf_parity import max_logprob_diff

    # step 0: one normalisation shift (0.3) for every token: no spread
    ours = [{"a": -0.1, "b": -2.0, "c": -5.0}, {"c": -0.5, "d": -1.0, "\ufffd": -1.0}]
    theirs = [{"a": -0.4, "b": -2.3, "z": -1.0}, {"c": -0.2, "d": -1.5, "\ufffd": -9.0}]
    assert max_logprob_diff(ours, theirs, 1) == pytest.approx(0.0)
    assert max_logprob_diff(ours, theirs, 2) == pytest.approx(0.8)  # byte-token text skipped
    assert max_logprob_diff([{"a": 0.0}], [{"a": -1.0, "b": 0.0}], 1) is None  # one shared


def test_embeddings_bench_counts_what_it_reports(server_url: str) -> None:
    """bench/embeddings.py against mock://echo: both throughput rows embed `batch` inputs of
    `tokens` tokens, and the ITL summary takes only the gaps inside its window."""
    from bench.embeddings import _inputs, _itl, throughput

    model = httpx.get(server_url + "/v1/models").json()["data"][0]["id"]
    rows = throughput(server_url, model, tokens=8, batch=3, repeat=1)
    assert [r["inputs per request"] for r in rows] == [1, 3]
    for row in rows:
        assert row["inputs"] == 3
        assert row["prompt tok/s"] == pytest.approx(row["emb/s"] * 8)
    with httpx.Client(base_url=server_url) as http:
        inputs = _inputs(http, model, 5, 8, seed=0)
    assert [len(i) for i in inputs] == [8] * 5 and inputs[0] != inputs[1]
    stamps = [[0.0, 0.010, 0.030, 1.0], [0.005, 0.025]]
    summary = _itl(stamps, 0.0, 0.5)  # gaps 10, 20 (stream 1) and 20 ms (stream 2); not 970
    assert summary["gaps"] == 3.0
    assert summary["ITL p50 ms"] == pytest.approx(20.0)
    assert summary["ITL max ms"] == pytest.approx(20.0)


def test_speculative_bench_counts_tokens_and_drafts(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/speculative.py's pieces against `mock://echo --speculative-mode ngram`: the load
    counts the completion tokens it got, the drafts' counters come from /metrics, and the table
    gives each mode's ratio to plain."""
    from bench.speculative import _spec_counters, report, run_load

    args = ["--log-level", "warning", "--speculative-mode", "ngram", "--overrides",
            "spec_draft_length=3"]  # fmt: skip
    with open_mlctrio_server(MODEL, args) as url:
        prompts = ["one two three one two three one two three"] * 3
        tok_s = run_load(url, "mock://echo", prompts, clients=2, max_tokens=100)
        drafts, drafted, accepted = _spec_counters(url) or (0, 0, 0)
    assert tok_s > 0 and drafts > 0 and 0 < accepted <= drafted
    best = {"plain": {"copy@1": {"tok_s": 10.0}},
            "ngram": {"copy@1": {"tok_s": 25.0, "accept": (3.0, 0.75)}}}  # fmt: skip
    report(best, argparse.Namespace(workloads=["copy"], levels=[1]))
    table = capsys.readouterr().out
    assert "25.0 (2.50x) acc 3.00/75%" in table and " | plain | 10.0" in table


def test_ngram_replay_keeps_every_token_and_the_oracle_never_misses() -> None:
    """bench/ngram_replay.py's replay on an answer that copies its prompt, then leaves it: every
    policy yields the answer's tokens exactly once, never drafts past max_tokens, and the oracle
    drafts only what holds, in no more steps than any fixed length."""
    from bench.ngram_replay import Replay, replay

    prompt = list(range(100, 140))
    answer = [7, *prompt[:30], 999, 998, 997]
    cost = [1.0 + 0.1 * t for t in range(17)]
    runs = {
        p: replay(prompt, answer, p, cost) for p in ("k=0", "k=4", "k=16", "adaptive", "oracle")
    }
    for policy, run in runs.items():
        assert run.tokens == len(answer) - 1, policy
        done = 1
        for drafted, kept in run.steps:
            assert 0 <= kept <= drafted and done + drafted < len(answer), policy
            done += kept + 1
    assert len(runs["k=0"].steps) == len(answer) - 1
    assert runs["k=0"].decode_seconds(cost) == len(answer) - 1
    oracle = runs["oracle"]
    assert all(d == k for d, k in oracle.steps) and sum(k for _, k in oracle.steps) >= 20
    assert all(len(oracle.steps) <= len(r.steps) for r in runs.values())
    assert runs["adaptive"].decode_seconds(cost) < runs["k=0"].decode_seconds(cost)
    assert Replay([(3, 1), (20, 20)]).decode_seconds(cost) == cost[3] + cost[16]
