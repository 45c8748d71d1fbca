"""Embeddings throughput, and what an embedding burst does to running chat streams.

Starts `mlctrio serve MODEL --mode server` (default: the embedded SmolLM2-135M-Instruct) and
measures over HTTP, as a client sees it:

1. embeddings per second for inputs of exactly `--tokens` tokens (token-id inputs), sent one
   input per request (batch 1, requests one after another) and `--batch` inputs per request;
2. the inter-token latency (p50 / p99 / max) of `--streams` chat streams, first alone, then
   while one request embeds `--burst` inputs of `--tokens` tokens. Embedding prompts are
   scheduled like any prefill: chunked and mixed with the streams' decodes, so the streams slow
   down (each step carries prompt chunks) but never stop.

    python bench/embeddings.py [--model demo://small] [--tokens 128] [--batch 32] [--burst 64]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import open_mlctrio_server, print_table
from mlctrio.cli import DEFAULT_MODEL

_WORDS = (
    "the model server answers every request with tokens from a compiled graph while other "
    "clients stream their chat replies over the same port and nobody waits too long for a "
    "page of cache memory that holds keys and values for each sequence in the batch"
).split()


def _inputs(http: httpx.Client, model: str, n: int, tokens: int, seed: int) -> list[list[int]]:
    """n inputs of exactly `tokens` token ids of the served model: windows of a tokenized text
    of shuffled words (valid ids for any tokenizer, unlike random ids)."""
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(_WORDS, size=2 * n * tokens))
    body = {"model": model, "prompt": text, "add_special_tokens": False}
    ids = http.post("/tokenize", json=body, timeout=120).json()["tokens"]
    return [ids[k * tokens : (k + 1) * tokens] for k in range(n)]


def embed(http: httpx.Client, model: str, inputs: list[list[int]]) -> float:
    start = time.perf_counter()
    r = http.post("/v1/embeddings", json={"model": model, "input": inputs}, timeout=600)
    r.raise_for_status()
    assert len(r.json()["data"]) == len(inputs)
    return time.perf_counter() - start


def throughput(url: str, model: str, tokens: int, batch: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=url) as http:
        embed(http, model, _inputs(http, model, 2, tokens, 0))  # warm-up
        singles = _inputs(http, model, batch, tokens, 1)
        best1 = min(sum(embed(http, model, [x]) for x in singles) for _ in range(repeat))
        rows.append({"inputs per request": 1, "inputs": batch, "emb/s": batch / best1,
                     "prompt tok/s": batch * tokens / best1})  # fmt: skip
        many = _inputs(http, model, batch, tokens, 2)
        best = min(embed(http, model, many) for _ in range(repeat))
        rows.append({"inputs per request": batch, "inputs": batch, "emb/s": batch / best,
                     "prompt tok/s": batch * tokens / best})  # fmt: skip
    return rows


def _stream(url: str, model: str, max_tokens: int, stamps: list[float]) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.7,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=url, timeout=600) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    stamps.append(time.perf_counter())


def _itl(stamps: list[list[float]], lo: float, hi: float) -> dict[str, float]:
    gaps = [(b - a) * 1000 for s in stamps for a, b in itertools.pairwise(s) if lo <= a and b <= hi]
    if len(gaps) < 2:
        return {}
    gaps.sort()
    return {"ITL p50 ms": statistics.median(gaps), "ITL p99 ms": gaps[int(0.99 * (len(gaps) - 1))],
            "ITL max ms": gaps[-1], "gaps": float(len(gaps))}  # fmt: skip


def burst(url: str, model: str, streams: int, tokens: int, n: int) -> list[dict[str, Any]]:
    stamps: list[list[float]] = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=_stream, args=(url, model, 400, stamps[i])) for i in range(streams)
    ]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 20:  # every stream is decoding
        time.sleep(0.05)
    alone_from = time.perf_counter()
    time.sleep(2.0)
    with httpx.Client(base_url=url) as http:
        start = time.perf_counter()
        took = embed(http, model, _inputs(http, model, n, tokens, 3))
        end = time.perf_counter()
    for t in threads:
        t.join()
    alone = _itl(stamps, alone_from, start)
    during = _itl(stamps, start, end)
    return [
        {"phase": "streams alone (2 s)", **alone},
        {"phase": f"during {n} x {tokens}-token embed ({took:.2f} s)", **during},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with open_mlctrio_server(
        args.model, args=["--mode", "server", "--log-level", "warning"], startup_timeout_s=900
    ) as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        rows = throughput(url, model, args.tokens, args.batch, args.repeat)
        print_table(f"{model}: {args.tokens}-token inputs", list(rows[0]), rows, 1)
        print()
        rows = burst(url, model, args.streams, args.tokens, args.burst)
        cols = ["ITL p50 ms", "ITL p99 ms", "ITL max ms", "gaps"]
        print_table(f"{args.streams} chat streams", cols, rows, 1)


if __name__ == "__main__":
    main()
