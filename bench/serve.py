"""Closed-loop load generator for any OpenAI-compatible server (mlctrio, vLLM, llama.cpp's server).

    python bench/serve.py --base-url http://127.0.0.1:8000 --concurrency 1,4,16 \\
        --prompt-tokens 128 --output-tokens 128 --num-requests 64 \\
        --json-out results.json --plot-out results.png

C workers each send their next streaming request as soon as the previous one finished, for
`--num-requests` requests per concurrency level (or until `--duration` seconds have passed,
whichever comes first; `--max-time` is a hard stop). Every request asks for exactly
`--output-tokens` tokens (`max_tokens` + `ignore_eos: true`) for a prompt of about
`--prompt-tokens` tokens, and is measured on the client:

* TTFT: request sent -> first chunk carrying text;
* ITL: every gap between two consecutive chunks carrying text;
* TPOT: (e2e - TTFT) / (output tokens - 1), one value per request;
* e2e: request sent -> end of the stream.

Output tokens are the server's `usage.completion_tokens` (asked for with
`stream_options.include_usage`) when it sends them, else the number of chunks carrying text.

Prompts are random English words. When the server has a tokenizer route (`POST /tokenize` and
`/detokenize`, vLLM / mlctrio shape or llama.cpp shape), each prompt is cut to exactly N tokens of
the served model's tokenizer (and with `--token-ids`, sent to /v1/completions as that list of
token ids); otherwise N words stand for N tokens. Every prompt is different, so a prefix cache
cannot turn the benchmark into a cache benchmark.

Depends only on httpx and trio (plus matplotlib for `--plot-out`), so the file can be copied next
to a vLLM or llama.cpp server and run there. The function API (`run_load`, `run_sweep`) is what
the other bench scripts use.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import trio

# This script is meant to run on other servers' machines with only httpx + trio installed, so its
# values are stdlib dataclasses rather than attrs classes.

Endpoint = Literal["chat", "completions"]
Prompt = str | list[int]

_PERCENTILES = (50, 90, 99)
_METRICS = ("ttft", "tpot", "itl", "e2e")
_PROMPT_BUILD_CONCURRENCY = 8  # tokenizer round trips while building prompts, not load

# Short, common words: most are one token with a leading space in BPE vocabularies, which makes
# "N words ~ N tokens" a usable fallback when the server has no tokenizer route.
_WORDS = tuple(
    """the of and to in is was that for on as with by he at from his an were are which this be or
    has had not first one their its new after but who they have her she two been other when there
    all during into school time may years more most only over city some world would where later up
    such used many can state about national out known university united then made states also
    under high both part three between team several well while year series film game music house
    water river road light group field power line side point place story name north south east
    west small large great early late long short open close black white green red blue old young
    day night home work play land sea air fire stone tree book paper door hand head voice color
    number system order market money price value table window garden summer winter
    morning""".split()
)


# -- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    """One closed-loop run at one concurrency level."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    endpoint: Endpoint = "chat"
    prompt_tokens: int = 128
    output_tokens: int = 128
    num_requests: int = 100  # measured requests (the cap on count)
    concurrency: int = 1
    duration_s: float | None = None  # stop starting requests after this many seconds
    max_time_s: float = 600.0  # hard stop of the measured phase: in-flight requests are dropped
    warmup: int = 0  # requests run (at the same concurrency) and discarded before measuring
    api_key: str | None = None
    token_ids: bool = False  # send prompts as token-id lists (completions endpoint only)
    timeout_s: float = 300.0  # per request: connect + each read
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < 1:
            raise ValueError("concurrency and num_requests must be >= 1")
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.warmup < 0:
            raise ValueError("prompt_tokens and output_tokens must be >= 1, warmup >= 0")
        if self.token_ids and self.endpoint != "completions":
            raise ValueError("token-id prompts need the completions endpoint")


@dataclass
class RequestRecord:
    """What the client saw of one streamed request (times in seconds)."""

    ok: bool
    start_s: float  # perf_counter() when the request was sent
    e2e_s: float = 0.0  # until [DONE], the end of the body, or the failure
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage, when the server sends it
    usage_reported: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Summary:
    """Mean and percentiles of one latency metric, in seconds (NaN when there is no sample)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        ordered = sorted(values)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = (percentile(ordered, q) for q in _PERCENTILES)
        return cls(len(ordered), sum(ordered) / len(ordered), p50, p90, p99)


@dataclass
class LoadResult:
    """The measured phase of one `run_load`."""

    config: LoadConfig
    model: str
    records: list[RequestRecord]
    duration_s: float  # first request sent -> last request finished
    client_cpu_s: float  # this process's CPU time during the run: is the client the bottleneck?
    truncated: bool = False  # max_time_s cut the run short

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def num_failed(self) -> int:
        return len(self.records) - len(self.ok)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    @property
    def request_throughput(self) -> float:
        return len(self.ok) / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def output_throughput(self) -> float:
        return self.num_output_tokens / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def mean_prompt_tokens(self) -> float:
        known = [r.prompt_tokens for r in self.ok if r.prompt_tokens is not None]
        return sum(known) / len(known) if known else math.nan

    def summary(self, metric: str) -> Summary:
        """`metric` is one of ttft, tpot, itl, e2e."""
        ok = self.ok
        if metric == "ttft":
            return Summary.of([r.ttft_s for r in ok if r.ttft_s is not None])
        if metric == "tpot":
            return Summary.of([t for r in ok if (t := r.tpot_s) is not None])
        if metric == "itl":
            return Summary.of([gap for r in ok for gap in r.itl_s])
        if metric == "e2e":
            return Summary.of([r.e2e_s for r in ok])
        raise ValueError(f"unknown metric {metric!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no per-request records)."""
        config = asdict(self.config)
        config.pop("api_key", None)  # never write a secret into a results file
        errors = sorted({r.error for r in self.records if r.error})
        return {
            "model": self.model,
            "config": config,
            "num_requests": len(self.records),
            "num_ok": len(self.ok),
            "num_failed": self.num_failed,
            "errors": errors[:10],
            "truncated": self.truncated,
            "duration_s": self.duration_s,
            "client_cpu_s": self.client_cpu_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "num_output_tokens": self.num_output_tokens,
            "mean_prompt_tokens": _json_float(self.mean_prompt_tokens),
            **{
                f"{m}_s": {k: _json_float(v) for k, v in asdict(self.summary(m)).items()}
                for m in _METRICS
            },
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated linearly (numpy's default method)."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


# -- talking to the server ---------------------------------------------------------------------


def api_root(base_url: str) -> str:
    """`http://host:port` from either that or `http://host:port/v1` (both are common)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def open_client(config: LoadConfig) -> httpx.AsyncClient:
    """One pooled client: one keep-alive connection per concurrent stream."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(
        base_url=api_root(config.base_url),
        headers=headers,
        timeout=httpx.Timeout(config.timeout_s, connect=30.0),
        limits=httpx.Limits(
            max_connections=config.concurrency + 4,
            max_keepalive_connections=config.concurrency + 4,
        ),
    )


async def default_model(client: httpx.AsyncClient) -> str:
    """The first model id the server lists."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return str(models[0]["id"])


def request_body(config: LoadConfig, model: str, prompt: Prompt) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one streaming request producing exactly output_tokens tokens."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": config.output_tokens,
        "ignore_eos": True,  # vLLM / mlctrio / llama.cpp extension: no early stop at EOS
        "temperature": 0.0,
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _chunk_text(choice: dict[str, Any]) -> str:
    """The text a streamed choice carries (reasoning text counts: it is generated tokens too)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return str(
            delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
        )
    return str(choice.get("text") or "")


async def send_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], retry_stale: bool = True
) -> RequestRecord:
    """Send one streaming request and time its chunks. Failures are recorded, not raised.

    A request that dies before any response on a pooled keep-alive connection (the server
    closed it while idle: llama-server does) is sent once more on a fresh connection, as the
    OpenAI SDK would, and timed from the second attempt."""
    start = time.perf_counter()
    record = RequestRecord(ok=False, start_s=start)
    state = _StreamState(last_s=start)
    responded = False
    try:
        async with client.stream("POST", path, json=body) as response:
            responded = True
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                record.error = f"HTTP {response.status_code}: {detail}"
                record.e2e_s = time.perf_counter() - start
                return record
            # Read to the end of the body, never `break`: an abandoned httpx line iterator is a
            # chain of async generators that trio can only finalize with a ResourceWarning.
            async for line in response.aiter_lines():
                if line.startswith("data:") and not state.done:
                    _on_event(line[5:].strip(), record, state, start)
    except httpx.HTTPError as exc:
        if retry_stale and not responded and isinstance(exc, httpx.RemoteProtocolError):
            return await send_request(client, path, body, retry_stale=False)
        record.error = f"{type(exc).__name__}: {exc}"
        record.e2e_s = time.perf_counter() - start
        return record
    record.e2e_s = state.end_s - start if state.done else time.perf_counter() - start
    if not record.usage_reported:
        record.output_tokens = state.chunks_with_text
    if record.error is None and record.ttft_s is None:
        record.error = "the stream carried no text"
    record.ok = record.error is None
    return record


@dataclass
class _StreamState:
    last_s: float  # when the previous chunk with text arrived
    chunks_with_text: int = 0
    done: bool = False  # [DONE] or an error event seen: the rest of the body is ignored
    end_s: float = 0.0


def _on_event(data: str, record: RequestRecord, state: _StreamState, start: float) -> None:
    """Account one SSE `data:` payload (lines that are not `data:` are separators or pings)."""
    now = time.perf_counter()
    if data == "[DONE]":
        state.done, state.end_s = True, now
        return
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        event = {"error": f"not JSON: {data[:100]}"}
    if "error" in event:
        record.error = f"stream error: {json.dumps(event['error'])[:200]}"
        state.done, state.end_s = True, now
        return
    usage = event.get("usage")
    if usage:
        record.usage_reported = True
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.prompt_tokens = usage.get("prompt_tokens")
    if any(_chunk_text(c) for c in event.get("choices") or ()):
        if record.ttft_s is None:
            record.ttft_s = now - start
        else:
            record.itl_s.append(now - state.last_s)
        state.last_s = now
        state.chunks_with_text += 1


# -- prompts -----------------------------------------------------------------------------------


def _random_words(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


@dataclass(frozen=True)
class _TokenizerRoutes:
    """One server family's /tokenize and /detokenize bodies: the text travels under `text_key`
    both ways (in the tokenize request, out of the detokenize answer)."""

    text_key: str
    special_key: str
    sends_model: bool


_ROUTE_FAMILIES = (
    _TokenizerRoutes("prompt", "add_special_tokens", sends_model=True),  # vLLM, mlctrio
    _TokenizerRoutes("content", "add_special", sends_model=False),  # llama.cpp server
)


class ServerTokenizer:
    """The served model's tokenizer over HTTP. The first route family that answers is
    remembered, so later prompts cost one round trip each."""

    def __init__(self, client: httpx.AsyncClient, model: str) -> None:
        self._client = client
        self._model = model
        self._routes: _TokenizerRoutes | None = None

    def _body(self, routes: _TokenizerRoutes, **fields: Any) -> dict[str, Any]:
        return {"model": self._model, **fields} if routes.sends_model else fields

    async def encode(self, text: str) -> list[int] | None:
        """Token ids of `text` without special tokens; None when the server has no such route."""
        for routes in (self._routes,) if self._routes else _ROUTE_FAMILIES:
            body = self._body(routes, **{routes.text_key: text, routes.special_key: False})
            response = await self._client.post("/tokenize", json=body)
            tokens = response.json().get("tokens") if response.status_code == 200 else None
            if tokens:  # llama.cpp answers a body it does not understand with []
                self._routes = routes
                # llama.cpp answers [{"id": .., "piece": ..}] when asked for pieces
                return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]
        return None

    async def decode(self, ids: list[int]) -> str | None:
        """The text of `ids`; None when the server has no detokenize route."""
        routes = self._routes or _ROUTE_FAMILIES[0]
        response = await self._client.post("/detokenize", json=self._body(routes, tokens=ids))
        text = response.json().get(routes.text_key) if response.status_code == 200 else None
        return text if isinstance(text, str) else None


async def _exact_prompt(
    tokenizer: ServerTokenizer, config: LoadConfig, rng: random.Random
) -> Prompt | None:
    """A prompt of exactly prompt_tokens tokens (or as near as the server's routes allow), or
    None when the server cannot tokenize."""
    num_words = config.prompt_tokens
    for _ in range(6):  # words are >= 1 token almost everywhere; grow if a tokenizer merges them
        words = [rng.choice(_WORDS) for _ in range(num_words)]
        ids = await tokenizer.encode(" ".join(words))
        if ids is None:
            return None
        if len(ids) >= config.prompt_tokens:
            if config.token_ids:
                return ids[: config.prompt_tokens]
            text = await tokenizer.decode(ids[: config.prompt_tokens])
            if text is None:  # no detokenize route: keep the words' share of the tokens
                text = " ".join(words[: len(words) * config.prompt_tokens // len(ids)])
            return text
        num_words *= 2
    raise RuntimeError(f"could not build a {config.prompt_tokens}-token prompt")


async def build_prompts(
    client: httpx.AsyncClient, model: str, config: LoadConfig, count: int
) -> list[Prompt]:
    """`count` different prompts of about prompt_tokens tokens each (see the module docstring)."""
    rng = random.Random(config.seed)
    tokenizer = ServerTokenizer(client, model)
    first = await _exact_prompt(tokenizer, config, rng)
    if first is None:
        print(
            "note: the server has no /tokenize route: using ~1 word per token "
            + ("and random token ids" if config.token_ids else "for the prompts"),
            file=sys.stderr,
        )
        if config.token_ids:  # ids 1000..9999 are ordinary text pieces in common vocabularies
            return [
                [rng.randrange(1000, 10000) for _ in range(config.prompt_tokens)]
                for _ in range(count)
            ]
        return [_random_words(rng, config.prompt_tokens) for _ in range(count)]
    prompts: list[Prompt] = [first] * count
    seeds = [rng.randrange(2**32) for _ in range(count)]
    limiter = trio.CapacityLimiter(_PROMPT_BUILD_CONCURRENCY)

    async def build(i: int) -> None:
        async with limiter:
            prompt = await _exact_prompt(tokenizer, config, random.Random(seeds[i]))
            if prompt is None:  # it answered for the first prompt: the server is failing
                raise RuntimeError("the server's /tokenize route stopped answering")
            prompts[i] = prompt

    async with trio.open_nursery() as nursery:
        for i in range(1, count):
            nursery.start_soon(build, i)
    return prompts


# -- the closed loop ---------------------------------------------------------------------------


async def _closed_loop(
    client: httpx.AsyncClient,
    config: LoadConfig,
    model: str,
    prompts: Sequence[Prompt],
    duration_s: float | None,
    records: list[RequestRecord],
) -> None:
    """`concurrency` workers drain one shared queue of prompts, one request at a time each.

    Records are appended as requests finish, so a caller that cancels us keeps what completed.
    """
    pending = iter(prompts)  # shared: trio runs one task at a time, so next() needs no lock
    deadline = None if duration_s is None else trio.current_time() + duration_s

    async def worker() -> None:
        for prompt in pending:
            if deadline is not None and trio.current_time() >= deadline:
                return
            path, body = request_body(config, model, prompt)
            records.append(await send_request(client, path, body))

    async with trio.open_nursery() as nursery:
        for _ in range(min(config.concurrency, len(prompts))):
            nursery.start_soon(worker)


async def run_load(config: LoadConfig, client: httpx.AsyncClient | None = None) -> LoadResult:
    """Warm up, then run `config.num_requests` requests at `config.concurrency` (trio)."""
    if client is None:
        async with open_client(config) as own:
            return await run_load(config, own)
    model = config.model or await default_model(client)
    prompts = await build_prompts(client, model, config, config.warmup + config.num_requests)
    if config.warmup:
        await _closed_loop(client, config, model, prompts[: config.warmup], None, [])
    records: list[RequestRecord] = []
    cpu0, start = time.process_time(), time.perf_counter()
    with trio.move_on_after(config.max_time_s) as scope:
        await _closed_loop(
            client, config, model, prompts[config.warmup :], config.duration_s, records
        )
    end = max((r.start_s + r.e2e_s for r in records), default=time.perf_counter())
    return LoadResult(
        config=config,
        model=model,
        records=records,
        duration_s=end - start,
        client_cpu_s=time.process_time() - cpu0,
        truncated=scope.cancelled_caught,
    )


async def run_sweep_async(
    config: LoadConfig,
    concurrencies: Sequence[int],
    on_result: Callable[[LoadResult], None] | None = None,
) -> list[LoadResult]:
    """`run_load` once per concurrency level, over one connection pool sized for the largest."""
    results = []
    async with open_client(replace(config, concurrency=max(concurrencies))) as client:
        for level, concurrency in enumerate(concurrencies):
            # A different seed per level: no level re-sends another level's prompts.
            level_config = replace(config, concurrency=concurrency, seed=config.seed + level)
            result = await run_load(level_config, client)
            if on_result is not None:
                on_result(result)
            results.append(result)
    return results


def run_sweep(
    config: LoadConfig,
    concurrencies: Sequence[int],
    on_result: Callable[[LoadResult], None] | None = None,
) -> list[LoadResult]:
    """Synchronous `run_sweep_async` (starts its own trio run)."""
    return trio.run(run_sweep_async, config, concurrencies, on_result)


# -- reporting ---------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.2f}"


def format_result(result: LoadResult) -> str:
    """A table of one run: throughput, then mean / p50 / p90 / p99 of each latency in ms."""
    c = result.config
    lines = [
        f"{c.endpoint} model={result.model} concurrency={c.concurrency} "
        f"prompt~{c.prompt_tokens} tok output={c.output_tokens} tok",
        f"{len(result.ok)} ok, {result.num_failed} failed in {result.duration_s:.2f} s"
        + (" (cut short by --max-time)" if result.truncated else "")
        + f": {result.request_throughput:.2f} req/s, {result.output_throughput:.1f} output tok/s, "
        f"mean prompt {result.mean_prompt_tokens:.0f} tok, client CPU "
        f"{100 * result.client_cpu_s / max(result.duration_s, 1e-9):.0f}%",
        f"{'(ms)':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for metric in _METRICS:
        s = result.summary(metric)
        lines.append(
            f"{metric.upper():<6}" + "".join(f"{_ms(v):>10}" for v in (s.mean, s.p50, s.p90, s.p99))
        )
    errors = sorted({r.error for r in result.records if r.error})
    lines += [f"error: {e}" for e in errors[:3]]
    return "\n".join(lines)


SWEEP_COLUMNS = (
    "conc", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
    "ITL p50", "ITL p99", "E2E p50", "E2E p99", "failed",
)  # fmt: skip


def sweep_rows(results: Sequence[LoadResult]) -> list[list[str]]:
    """One row of SWEEP_COLUMNS per result (latencies in ms)."""
    rows = []
    for r in results:
        row = [
            str(r.config.concurrency),
            f"{r.request_throughput:.2f}",
            f"{r.output_throughput:.0f}",
        ]
        for metric in _METRICS:
            s = r.summary(metric)
            row += [_ms(s.p50), _ms(s.p99)]
        row.append(str(r.num_failed))
        rows.append(row)
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Right-aligned columns; `markdown` gives a GitHub table (for the README)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    if markdown:
        out = ["| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |"]
        out.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
        out += [
            "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows
        ]
        return "\n".join(out)
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, results: Sequence[LoadResult]) -> None:
    """{"runs": [LoadResult.to_dict(), ...]} — one run per concurrency level."""
    Path(path).write_text(json.dumps({"runs": [r.to_dict() for r in results]}, indent=2) + "\n")


def plot_sweep(results: Sequence[LoadResult], path: str | Path) -> bool:
    """Throughput and latency percentiles against concurrency, as a PNG. False (with a message)
    when matplotlib is not installed: the rest of the report does not need it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to the file
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: skipping the plot (pip install matplotlib)",
            file=sys.stderr,
        )
        return False
    conc = [r.config.concurrency for r in results]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    axes[0][0].plot(conc, [r.output_throughput for r in results], "o-")
    axes[0][0].set_title("output tokens/s")
    axes[1][0].plot(conc, [r.request_throughput for r in results], "o-")
    axes[1][0].set_title("requests/s")
    for ax, metric in zip((*axes[0][1:], *axes[1][1:]), _METRICS, strict=True):
        for q in _PERCENTILES:
            values = [getattr(r.summary(metric), f"p{q}") * 1e3 for r in results]
            ax.plot(conc, values, "o-", label=f"p{q}")
        ax.set_title(f"{metric.upper()} (ms)")
        ax.legend()
    for ax in (*axes[0], *axes[1]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
    c = results[0].config
    fig.suptitle(
        f"{results[0].model} {c.endpoint}: "
        f"prompt ~{c.prompt_tokens} tok, output {c.output_tokens} tok"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- command line ------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of integers >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Closed-loop streaming load against an OpenAI-compatible server.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (or .../v1)")
    p.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=100, help="measured requests per level")
    p.add_argument("--concurrency", type=_int_list, default=[1], help="e.g. 1,4,16 (a sweep)")
    p.add_argument("--duration", type=float, help="stop starting requests after this many s")
    p.add_argument("--max-time", type=float, default=600.0, help="hard stop per level, s")
    p.add_argument("--warmup", type=int, default=0, help="discarded requests before each level")
    p.add_argument("--api-key")
    p.add_argument("--token-ids", action="store_true", help="prompts as token-id lists")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="write the results here")
    p.add_argument("--plot-out", help="PNG of the sweep (needs matplotlib)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = LoadConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        num_requests=args.num_requests,
        duration_s=args.duration,
        max_time_s=args.max_time,
        warmup=args.warmup,
        api_key=args.api_key,
        token_ids=args.token_ids,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    if args.num_requests < 2 * max(args.concurrency):
        print("note: fewer than 2 requests per worker: the loop never reaches a steady state")

    def report(result: LoadResult) -> None:
        print(format_result(result), end="\n\n", flush=True)

    results = run_sweep(config, args.concurrency, on_result=report)
    if len(results) > 1:
        print(format_table(SWEEP_COLUMNS, sweep_rows(results), markdown=False))
    if args.json_out:
        write_json(args.json_out, results)
        print(f"wrote {args.json_out}")
    if args.plot_out and plot_sweep(results, args.plot_out):
        print(f"wrote {args.plot_out}")
    return 1 if any(r.num_failed or r.truncated for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
