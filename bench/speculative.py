"""Speculative decoding: output tok/s with and without drafting, on the same target, one run.

    python bench/speculative.py                       # target: SmolLM2 F32, draft: its Q4_1
    python bench/speculative.py --target-type Q8_0 --concurrency 1,8 --rounds 2
    python bench/speculative.py --modes plain,ngram --workloads copy --no-llama
    python bench/speculative.py --target-type Q4_1 --modes plain,medusa,eagle --workloads chat

The target is the embedded SmolLM2-135M-Instruct converted with llama-quantize (`--target-type`,
F32 by default; `--target-type Q4_1` is the file itself), the draft model the embedded Q4_1
file. Servers, one at a time, each with `--threads` threads:

    plain        mlctrio serve TARGET
    ngram        mlctrio serve TARGET --speculative-mode ngram
    small_draft  mlctrio serve TARGET --speculative-mode small_draft --additional-models DRAFT
    medusa       mlctrio serve TARGET --speculative-mode medusa   (the heads mlctrio ships)
    eagle        mlctrio serve TARGET --speculative-mode eagle    (the draft layer it ships)
    llama        llama-server -m TARGET                       (unless --no-llama)
    llama-draft  llama-server -m TARGET -md DRAFT --spec-draft-n-max N  (--llama-draft-max)
    llama-ngram  llama-server -m TARGET --spec-type ngram-simple (n=4, m=16)

Workloads (chat completions, temperature 0, the model's chat template):

    chat   ordinary questions (`CHAT`)
    copy   rewrite or repeat a paragraph or a code block given in the prompt (`COPY`)

Each server first gets one short pass over the prompts (32 tokens each: mlctrio's draft-length
policy learns its costs in the first requests after a start). Then, at each concurrency level,
every prompt of the workload is sent once by a closed loop of that many clients; output tok/s =
completion tokens / wall time. The table shows each server's tok/s
and its ratio to the plain server of the same family (mlctrio modes / mlctrio plain, llama-draft /
llama) and, for mlctrio, the drafts' acceptance from /metrics (drafted tokens kept per draft,
and kept / drafted). Rounds alternate the servers; each keeps its best round. Only ratios from
the same run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llama_cpp
from bench._common import mlctrio_serve_cmd, print_table
from bench.llama_server import free_port, llama_server_cmd, start_server

CHAT = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is to a beginner.",
    "Write a short poem about the sea.",
    "What are the main differences between a cat and a dog as pets?",
    "How do I make a cup of green tea?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Why is the sky blue?",
]
_PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night its "
    "keeper climbed the narrow stairs, trimmed the wick and watched the ships pass in the dark. "
    "When the storms came, the light never failed, and the sailors who saw it knew they were "
    "close to home."
)
_CODE = (
    "def mean(values):\n    total = 0\n    for v in values:\n        total = total + v\n"
    "    return total / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n"
    "    total = 0\n    for v in values:\n        total = total + (v - m) ** 2\n"
    "    return total / len(values)\n"
)
COPY = [
    f"Repeat the following paragraph exactly, word for word:\n\n{_PARAGRAPH}",
    f"Copy this code exactly, then stop:\n\n{_CODE}",
    f"Rewrite this paragraph with the word 'lighthouse' in capital letters:\n\n{_PARAGRAPH}",
    f"Add a docstring to each function in this code and return the whole code:\n\n{_CODE}",
]
WORKLOADS = {"chat": CHAT, "copy": COPY}
MODES = ("plain", "ngram", "small_draft", "medusa", "eagle", "llama", "llama-draft", "llama-ngram")


def _chat_once(url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def run_load(url: str, model: str, prompts: Sequence[str], clients: int, max_tokens: int) -> float:
    """Output tok/s of `prompts` sent by `clients` concurrent clients (closed loop)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda p: _chat_once(url, model, p, max_tokens), prompts))
    return tokens / (time.perf_counter() - start)


def _spec_counters(url: str) -> tuple[float, float, float] | None:
    """(drafts, drafted tokens, accepted tokens) from an mlctrio server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = []
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        found = re.findall(rf"^mlctrio_spec_decode_{name}_total{{[^}}]*}} (\S+)$", text, re.M)
        if not found:
            return None
        values.append(sum(float(v) for v in found))
    return values[0], values[1], values[2]


@contextlib.contextmanager
def open_server(mode: str, target: Path, draft: Path, args: argparse.Namespace) -> Iterator[str]:
    port = free_port()
    env = {"TVM_NUM_THREADS": str(args.threads)}
    if mode.startswith("llama"):
        binary = llama_cpp.ensure_llama_server()
        extra = []
        if mode == "llama-draft":
            extra = ["-md", str(draft), "--spec-draft-n-max", str(args.llama_draft_max)]
        elif mode == "llama-ngram":  # llama.cpp's prompt lookup, tuned as the issue measured it
            extra = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4",
                     "--spec-ngram-simple-size-m", "16"]  # fmt: skip
        parallel = max(args.levels)
        cmd = llama_server_cmd(binary, target, port, threads=args.threads, parallel=parallel,
                               ctx_per_slot=2048, extra=extra)  # fmt: skip
    else:
        overrides = f"max_num_sequence={max(8, *args.levels)}"
        if args.spec_max_batch is not None:
            overrides += f";spec_max_batch={args.spec_max_batch}"
        extra = ["--mode", "server", "--overrides", overrides, "--activations", args.activations]
        if mode != "plain":
            extra += ["--speculative-mode", mode]
        if mode == "small_draft":
            extra += ["--additional-models", str(draft)]
        cmd = mlctrio_serve_cmd(target, port, extra, mode="server")
    server = start_server(mode, cmd, port, env=env, startup_timeout_s=900)
    try:
        yield server.url
    finally:
        server.stop()


def measure(mode: str, target: Path, draft: Path, args: argparse.Namespace) -> dict[str, Any]:
    """tok/s per (workload, level), plus the drafts' counters for mlctrio's modes."""
    out: dict[str, Any] = {}
    with open_server(mode, target, draft, args) as url:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        # Warm up every server alike with one short pass over the workloads' prompts: mlctrio's
        # draft-length policy learns its step costs and acceptance in the first requests after a
        # start, and the table is about the steady state.
        run_load(url, model, [p for w in args.workloads for p in WORKLOADS[w]], 1, 32)
        for workload in args.workloads:
            for level in args.levels:
                before = _spec_counters(url)
                prompts = WORKLOADS[workload] * max(1, level // len(WORKLOADS[workload]))
                tok_s = run_load(url, model, prompts, level, args.max_tokens)
                after = _spec_counters(url)
                row: dict[str, Any] = {"tok_s": tok_s}
                if before is not None and after is not None:
                    d, t, a = (x - y for x, y in zip(after, before, strict=True))
                    row["accept"] = (a / d if d else 0.0, a / t if t else 0.0)
                out[f"{workload}@{level}"] = row
    return out


def _ratio_base(mode: str) -> str:
    return "llama" if mode.startswith("llama") else "plain"


def report(best: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    cols = [f"{w}@{lv}" for w in args.workloads for lv in args.levels]
    rows = []
    for mode, cells in best.items():
        base = best.get(_ratio_base(mode), {})
        row: dict[str, object] = {"server": mode}
        for col in cols:
            cell = cells.get(col)
            if cell is None:
                continue
            text = f"{cell['tok_s']:.1f}"
            if col in base and mode != _ratio_base(mode):
                text += f" ({cell['tok_s'] / base[col]['tok_s']:.2f}x)"
            if cell.get("accept") and cell["accept"][0]:
                text += f" acc {cell['accept'][0]:.2f}/{cell['accept'][1]:.0%}"
            row[col] = text
        rows.append(row)
    print_table("output tok/s", ["server", *cols], rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--target-type", default="F32", help="llama-quantize type of the target")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workloads", default="chat,copy")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--llama-draft-max", type=int, default=8)
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--activations", default="auto", help="mlctrio's --activations (f32, q8)")
    p.add_argument(
        "--spec-max-batch", type=int, default=None,
        help="mlctrio's spec_max_batch override (to measure where drafting stops paying)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write every round's figures here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",")]
    args.workloads = [w for w in args.workloads.split(",") if w]
    modes = [
        m for m in args.modes.split(",") if m and not (args.no_llama and m.startswith("llama"))
    ]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    from mlctrio.models.fetch import DEFAULT_EMBEDDED, ensure_embedded

    draft = ensure_embedded(DEFAULT_EMBEDDED)
    target = draft if args.target_type == "Q4_1" else llama_cpp.cached_quantized_gguf(
        draft, args.target_type
    )  # fmt: skip
    print(f"target {target.name}, draft {draft.name}, {args.threads} threads", flush=True)
    rounds: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    for k in range(args.rounds):
        order = modes if k % 2 == 0 else modes[::-1]
        figures = {}
        for mode in order:
            figures[mode] = measure(mode, target, draft, args)
            print(f"round {k + 1} {mode}: {json.dumps(figures[mode])}", flush=True)
            for col, cell in figures[mode].items():
                kept = best.setdefault(mode, {}).get(col)
                if kept is None or cell["tok_s"] > kept["tok_s"]:
                    best[mode][col] = cell
        rounds.append(figures)
    report({m: best[m] for m in modes}, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
