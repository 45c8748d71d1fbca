"""Two replicas + sglang-router vs one server, same total cores: throughput and prefix-cache hits.

    python bench/replicas.py [--model demo://small | --real] [--duration 60] [--concurrency 8]
        [--system-prompts 8] [--system-tokens 500] [--output-tokens 32] [--cache-seqs N]
        [--setups single,cache_aware,round_robin]

The workload: `--system-prompts` distinct system prompts of exactly `--system-tokens` tokens
(random common words cut with the server's /tokenize), each request one of them (a seeded random
choice) plus a varied user turn of 8-40 words; chat, not streamed, `ignore_eos`, `max_tokens =
--output-tokens`, `temperature 0`; a closed loop of `--concurrency` clients for `--duration`
seconds (no new request after that). Request i is the same in every setup.

Setups, one after another, each started fresh (cold caches) and stopped with SIGTERM:
- `single`: one `mlctrio serve MODEL --mode server` with TVM_NUM_THREADS = all usable cores.
- `cache_aware`, `round_robin`: `mlctrio serve MODEL --mode server --replicas 2 --router-policy
  P` (each replica pinned to its own half of the cores, TVM_NUM_THREADS = its share), clients
  to the router.

Per setup: aggregate output tok/s (completion tokens / first request sent -> last answered),
the prefix-cache hit rate two ways (client side: sum of usage.prompt_tokens_details.cached_tokens
/ sum of prompt_tokens; server side: the delta of every replica's mlctrio_prefix_cache_hits_total
/ mlctrio_prefix_cache_queries_total over the run), the ceiling of that rate (the system prompts'
share of the prompt tokens: a user turn is never cached), and how many requests each replica
finished.
Exit status 1 if a request failed, a unit did not stop cleanly, or cache_aware's hit rate is not
above round_robin's. On a shared machine tok/s moves a lot from run to run; the hit rate depends
only on routing and is the robust figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import free_port_run, print_table
from bench.serve import _WORDS, LoadConfig, ServerTokenizer, _exact_prompt

REAL_MODEL = "embedded://SmolLM2-135M-Instruct"
_METRIC = re.compile(r"^(mlctrio_[a-z_]+_total)\{[^}]*\} ([0-9.e+]+)$", re.M)


@dataclass
class Server:
    """A started setup: where clients go, and every replica's own URL (for /metrics)."""

    url: str
    replicas: list[str]


@dataclass
class Tally:
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    first_s: float = 0.0
    last_s: float = 0.0


def _get_ok(url: str, predicate: Any = None) -> bool:
    try:
        r = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and (predicate is None or bool(predicate(r.json())))


def _all_healthy(n: int) -> Any:
    return lambda body: sum(w["is_healthy"] for w in body.get("workers", [])) == n


@contextlib.contextmanager
def start_setup(setup: str, args: argparse.Namespace) -> Iterator[Server]:
    """Run one setup's processes; SIGTERM at the end, whose exit status must be 0."""
    port = free_port_run(4)  # the server or router, 2 replicas, the router's Prometheus port
    cmd = [sys.executable, "-m", "mlctrio", "serve", args.model, "--mode", "server"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    if args.cache_seqs is not None:
        cmd += ["--overrides", f"prefix_cache_max_num_recycling_seqs={args.cache_seqs}"]
    env = dict(os.environ, TVM_NUM_THREADS=str(len(os.sched_getaffinity(0))))
    url = f"http://127.0.0.1:{port}"
    if setup == "single":
        server, ready = Server(url, [url]), (f"{url}/health", None)
    else:
        cmd += ["--replicas", "2", "--router-policy", setup]
        server = Server(url, [f"http://127.0.0.1:{port + i}" for i in (1, 2)])
        ready = (f"{url}/workers", _all_healthy(2))
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + args.startup_timeout
            while not _get_ok(*ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-3000:].decode(errors="replace")
                    raise RuntimeError(f"{setup}: did not start (status {proc.poll()}):\n{tail}")
                time.sleep(0.2)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                log.seek(0)
                print(
                    f"{setup}: exited with {code}:\n{log.read()[-3000:].decode(errors='replace')}"
                )
                args.unclean.append(setup)


async def build_system_prompts(url: str, model: str, args: argparse.Namespace) -> list[str]:
    """`--system-prompts` distinct texts of exactly `--system-tokens` tokens of the model."""
    config = LoadConfig(prompt_tokens=args.system_tokens)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        tokenizer = ServerTokenizer(client, model)
        prompts = []
        for k in range(args.system_prompts):
            text = await _exact_prompt(tokenizer, config, random.Random(f"system {k}"))
            assert isinstance(text, str), "the server has no /tokenize route"
            prompts.append(text)
    return prompts


def request_body(
    i: int, model: str, systems: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Request i: a seeded choice of system prompt and a varied user turn (the same every run)."""
    rng = random.Random(f"request {i}")
    user = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40)))
    messages = [{"role": "system", "content": rng.choice(systems)}]
    messages.append({"role": "user", "content": f"Question {i}: {user}?"})
    return {
        "model": model, "messages": messages, "max_tokens": args.output_tokens,
        "ignore_eos": True, "temperature": 0,
    }  # fmt: skip


async def closed_loop(url: str, model: str, systems: list[str], args: argparse.Namespace) -> Tally:
    tally = Tally(first_s=time.perf_counter())
    stop_at = tally.first_s + args.duration
    next_index = iter(range(10**9))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            i = next(next_index)
            body = request_body(i, model, systems, args)
            try:
                r = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                tally.failed.append(f"request {i}: {exc!r}")
                continue
            if r.status_code != 200:
                tally.failed.append(f"request {i}: {r.status_code} {r.text[:200]}")
                continue
            usage = r.json()["usage"]
            tally.requests += 1
            tally.prompt_tokens += usage["prompt_tokens"]
            tally.cached_tokens += (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0
            )
            tally.output_tokens += usage["completion_tokens"]
            tally.last_s = time.perf_counter()

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(client_loop, client)
    return tally


def scrape(urls: list[str]) -> list[dict[str, float]]:
    """Every replica's mlctrio_*_total counters (summed over their labels)."""
    out = []
    for url in urls:
        counters: dict[str, float] = {}
        for name, value in _METRIC.findall(httpx.get(f"{url}/metrics", timeout=10).text):
            counters[name] = counters.get(name, 0.0) + float(value)
        out.append(counters)
    return out


def run_setup(setup: str, args: argparse.Namespace, systems: list[str]) -> dict[str, object]:
    with start_setup(setup, args) as server:
        model = httpx.get(f"{server.replicas[0]}/v1/models", timeout=10).json()["data"][0]["id"]
        if not systems:
            systems += trio.run(build_system_prompts, server.replicas[0], model, args)
        before = scrape(server.replicas)
        tally = trio.run(closed_loop, server.url, model, systems, args)
        after = scrape(server.replicas)
    for failure in tally.failed[:5]:
        print(f"{setup}: failed {failure}")
    args.failed += len(tally.failed)
    delta = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
    hits = sum(d.get("mlctrio_prefix_cache_hits_total", 0.0) for d in delta)
    queries = sum(d.get("mlctrio_prefix_cache_queries_total", 0.0) for d in delta)
    per_replica = [int(d.get("mlctrio_request_success_total", 0.0)) for d in delta]
    cores = len(os.sched_getaffinity(0))
    return {
        "setup": setup if setup == "single" else f"2 replicas, {setup}",
        "threads": str(cores) if setup == "single" else f"{cores // 2} + {cores - cores // 2}",
        "requests": tally.requests,
        "failed": len(tally.failed),
        "out tok/s": tally.output_tokens / max(tally.last_s - tally.first_s, 1e-9),
        "hit % (usage)": 100.0 * tally.cached_tokens / max(tally.prompt_tokens, 1),
        "hit % (/metrics)": 100.0 * hits / max(queries, 1.0),
        "prompt tok": round(tally.prompt_tokens / max(tally.requests, 1)),
        "ceiling %": 100.0 * args.system_tokens * tally.requests / max(tally.prompt_tokens, 1),
        "requests per replica": " / ".join(map(str, per_replica)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo://small", help="demo://small (default), demo://tiny")
    p.add_argument("--real", action="store_true", help=f"use {REAL_MODEL}")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per setup")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument(
        "--cache-seqs",
        type=int,
        default=None,
        help="finished sequences each prefix cache keeps (mlctrio's default: 16)",
    )
    p.add_argument("--setups", default="single,cache_aware,round_robin")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds (a compile)")
    args = p.parse_args(argv)
    if args.real:
        args.model = REAL_MODEL
    args.unclean, args.failed = [], 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(
        f"# {args.model}, {cores} cores; {args.system_prompts} system prompts of "
        f"{args.system_tokens} tokens, varied user turns, {args.output_tokens} output tokens, "
        f"{args.concurrency} clients, {args.duration:.0f} s per setup; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    systems: list[str] = []
    rows = [run_setup(setup, args, systems) for setup in args.setups.split(",")]
    print()
    cols = [
        "setup", "threads", "requests", "failed", "out tok/s", "hit % (usage)", "hit % (/metrics)",
        "ceiling %", "prompt tok", "requests per replica",
    ]  # fmt: skip
    print_table("replicas", cols, rows, digits=1)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}. tok/s is noisy on a shared machine; "
          "the hit rate depends only on where requests land and is the robust figure.")  # fmt: skip
    hit = {str(r["setup"]): float(r["hit % (usage)"]) for r in rows}  # type: ignore[arg-type]
    ok = not args.failed and not args.unclean
    aware, robin = hit.get("2 replicas, cache_aware"), hit.get("2 replicas, round_robin")
    if aware is not None and robin is not None:
        verdict = aware > robin
        print(f"cache_aware hit rate {aware:.1f}% vs round_robin {robin:.1f}%: "
              + ("higher, as it should be" if verdict else "NOT higher"))  # fmt: skip
        ok &= verdict
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
