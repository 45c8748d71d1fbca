"""The soak's mixed load (bench/soak.py): scenarios that several concurrent clients pick at random
until a deadline, each recording what it saw in a `Tally`.

Scenarios: streaming and non-streaming chat and completions, n > 1, clients that disconnect
mid-stream, bursts past the queue limit (503 expected), bad requests (malformed JSON, unknown
model, an invalid parameter, a wrong API key when keys are set), a POST to an unknown route whose
body comes late (the 404 should not wait for it), and occasional big prompts.

Rules: a scenario never raises for what the server does (statuses, truncated streams and
connection errors are tallied); sleeps here shape the load (think time, a delayed body), never
synchronise. Depends on httpx and trio only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from bench.soak_checks import Tally, check_sse, is_error_envelope

_WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "number night point home water room mother area money story fact month lot right study"
).split()


@dataclass
class LoadContext:
    client: httpx.AsyncClient  # base_url set to the server's root
    model: str
    host: str
    port: int
    api_key: str | None = None
    burst: int = 40  # concurrent requests fired by one queue-limit burst
    big_prompt_chars: int = 3000
    timeout_s: float = 120.0
    tally: Tally = field(default_factory=Tally)
    burst_lock: trio.Lock = field(default_factory=trio.Lock)
    done: int = 0  # requests finished (any outcome): the sampler's progress column

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _chat(ctx: LoadContext, rng: random.Random, **extra: Any) -> dict[str, Any]:
    body = {
        "model": ctx.model,
        "messages": [{"role": "user", "content": words(rng, rng.randint(3, 40))}],
        "max_tokens": rng.randint(4, 48),
        "temperature": rng.choice([0.0, 0.7]),
    }
    return body | extra


def _completion(ctx: LoadContext, rng: random.Random, **extra: Any) -> dict[str, Any]:
    body = {"model": ctx.model, "prompt": words(rng, rng.randint(3, 40))}
    return body | {"max_tokens": rng.randint(4, 48)} | extra


# -- recording ------------------------------------------------------------------------------------


def _record(ctx: LoadContext, kind: str, status: int, content: bytes, n: int = 1) -> None:
    ctx.tally.statuses[(kind, str(status))] += 1
    if status >= 400:
        if not is_error_envelope(content):
            ctx.tally.bad_envelopes.append(f"{kind} {status}: {content[:120]!r}")
    elif kind.startswith("bad:"):
        ctx.tally.malformed.append(f"{kind} answered {status}: {content[:120]!r}")
    elif status == 200:
        try:
            choices = httpx.Response(200, content=content).json().get("choices")
        except ValueError:
            choices = None
        if not isinstance(choices, list) or len(choices) != n:
            ctx.tally.malformed.append(f"{kind}: expected {n} choices: {content[:120]!r}")


async def post_json(
    ctx: LoadContext,
    kind: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    n: int = 1,
) -> int | None:
    """A non-streaming POST, tallied; the status (None: a connection error)."""
    try:
        response = await ctx.client.post(
            path,
            json=body if content is None else None,
            content=content,
            headers=headers if headers is not None else ctx.headers,
            timeout=ctx.timeout_s,
        )
    except httpx.TransportError as exc:
        ctx.tally.conn_error(kind, exc)
        return None
    finally:
        ctx.done += 1
    _record(ctx, kind, response.status_code, response.content, n)
    return response.status_code


async def stream(
    ctx: LoadContext,
    kind: str,
    path: str,
    body: dict[str, Any],
    *,
    n: int = 1,
) -> None:
    """A streaming POST, read to its end and tallied; a 200 must end complete (`check_sse`)."""
    parts: list[str] = []
    got_200 = False
    try:
        async with ctx.client.stream(
            "POST", path, json=body | {"stream": True}, headers=ctx.headers, timeout=ctx.timeout_s
        ) as response:
            if response.status_code != 200:
                _record(ctx, kind, response.status_code, await response.aread())
                return
            got_200 = True
            async for text in response.aiter_text():
                parts.append(text)
    except httpx.TransportError as exc:
        if got_200:
            ctx.tally.truncated.append(f"{kind}: {type(exc).__name__} after 200: {exc}")
        else:
            ctx.tally.conn_error(kind, exc)
        return
    finally:
        ctx.done += 1
    check = check_sse("".join(parts))
    ctx.tally.statuses[(kind, "200")] += 1
    if not check.complete(n):
        ctx.tally.truncated.append(
            f"{kind}: {check.events} events, done={check.done}, finished={sorted(check.finished)}"
            f" of {n}, after_done={check.after_done}, error={check.error}"
        )


# -- scenarios ------------------------------------------------------------------------------------


async def chat_stream(ctx: LoadContext, rng: random.Random) -> None:
    body = _chat(ctx, rng, stream_options={"include_usage": True})
    await stream(ctx, "chat_stream", "/v1/chat/completions", body)


async def chat(ctx: LoadContext, rng: random.Random) -> None:
    await post_json(ctx, "chat", "/v1/chat/completions", _chat(ctx, rng))


async def completion_stream(ctx: LoadContext, rng: random.Random) -> None:
    await stream(ctx, "completion_stream", "/v1/completions", _completion(ctx, rng))


async def completion(ctx: LoadContext, rng: random.Random) -> None:
    await post_json(ctx, "completion", "/v1/completions", _completion(ctx, rng))


async def n_choices(ctx: LoadContext, rng: random.Random) -> None:
    n = rng.randint(2, 4)
    if rng.random() < 0.5:
        await stream(ctx, "n>1_stream", "/v1/chat/completions", _chat(ctx, rng, n=n), n=n)
    else:
        await post_json(ctx, "n>1", "/v1/completions", _completion(ctx, rng, n=n), n=n)


async def disconnect(ctx: LoadContext, rng: random.Random) -> None:
    """A streaming chat whose client hangs up after a few events, on a bare socket (httpx leaves
    its inner async generators unfinished when a stream is closed early)."""
    body = _chat(ctx, rng, max_tokens=rng.randint(64, 256), ignore_eos=True, stream=True)
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {ctx.api_key}\r\n" if ctx.api_key else ""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {ctx.host}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    want = rng.randint(1, 6)
    buf = b""
    try:
        sock = await trio.open_tcp_stream(ctx.host, ctx.port)
    except OSError as exc:
        ctx.tally.conn_error("disconnect", exc)
        return
    async with sock:
        try:
            await sock.send_all(head.encode() + data)
            with trio.move_on_after(ctx.timeout_s):
                while buf.count(b"data:") < want and (chunk := await sock.receive_some(65536)):
                    buf += chunk
        except (trio.BrokenResourceError, OSError) as exc:
            ctx.tally.conn_error("disconnect", exc)
            return
        finally:
            ctx.done += 1
    if not buf.startswith(b"HTTP/1.1 "):
        ctx.tally.conn_error("disconnect", "no response")
        return
    status = buf.split(b" ", 2)[1].decode()
    if status != "200":
        _record(ctx, "disconnect", int(status), buf.partition(b"\r\n\r\n")[2])
    elif buf.count(b"data:") >= want:
        ctx.tally.statuses[("disconnect", "200 hung up")] += 1
    else:  # the stream ended (or stalled) before the events this client waited for
        ctx.tally.truncated.append(f"disconnect: {buf.count(b'data:')} of {want} events came")


async def big_prompt(ctx: LoadContext, rng: random.Random) -> None:
    text = words(rng, ctx.big_prompt_chars // 5)[: ctx.big_prompt_chars]
    body = _chat(ctx, rng, max_tokens=8) | {"messages": [{"role": "user", "content": text}]}
    if rng.random() < 0.5:
        await stream(ctx, "big_prompt_stream", "/v1/chat/completions", body)
    else:
        await post_json(ctx, "big_prompt", "/v1/chat/completions", body)


async def bad_request(ctx: LoadContext, rng: random.Random) -> None:
    json_headers = ctx.headers | {"Content-Type": "application/json"}
    choices = ["json", "model", "param"] + (["auth"] if ctx.api_key else [])
    match rng.choice(choices):
        case "json":
            await post_json(
                ctx, "bad:json", "/v1/chat/completions", content=b'{"model": ', headers=json_headers
            )
        case "model":
            body = _chat(ctx, rng) | {"model": "no-such-model"}
            await post_json(ctx, "bad:model", "/v1/chat/completions", body)
        case "param":
            await post_json(ctx, "bad:param", "/v1/completions", _completion(ctx, rng, n=0))
        case _:
            headers = {"Authorization": "Bearer wrong-key"}
            body = _chat(ctx, rng)
            await post_json(ctx, "bad:auth", "/v1/chat/completions", body, headers=headers)


async def queue_burst(ctx: LoadContext, rng: random.Random) -> None:
    """Fire `ctx.burst` requests at once (more than running + queued slots): some get 503."""
    if ctx.burst_lock.locked():
        await chat(ctx, rng)
        return
    async with ctx.burst_lock, trio.open_nursery() as nursery:
        for _ in range(ctx.burst):
            body = _chat(ctx, rng, max_tokens=rng.randint(16, 64), ignore_eos=True)
            nursery.start_soon(post_json, ctx, "burst", "/v1/chat/completions", body)


async def early_404(ctx: LoadContext, rng: random.Random) -> None:
    """POST to an unknown route and send the body only later: the 404 should come first."""
    body = b'{"padding": "' + b"x" * rng.randint(10, 4000) + b'"}'
    head = (
        f"POST /v1/no-such-route HTTP/1.1\r\nHost: {ctx.host}\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    buf = b""
    try:
        sock = await trio.open_tcp_stream(ctx.host, ctx.port)
    except OSError as exc:
        ctx.tally.conn_error("early404", exc)
        return
    async with sock:
        try:
            await sock.send_all(head.encode())
            with trio.move_on_after(2.0):
                while b"\r\n\r\n" not in buf and (chunk := await sock.receive_some(65536)):
                    buf += chunk
            early = b"\r\n\r\n" in buf
            await trio.sleep(rng.uniform(0.0, 0.5))  # the late body
            await sock.send_all(body)
            with trio.move_on_after(ctx.timeout_s):
                while chunk := await sock.receive_some(65536):
                    buf += chunk
        except (trio.BrokenResourceError, OSError):
            early = b"\r\n\r\n" in buf  # the server may close once it answered
    ctx.done += 1
    if not buf.startswith(b"HTTP/1.1 "):
        ctx.tally.conn_error("early404", "no response")
        return
    ctx.tally.statuses[("early404", buf.split(b" ", 2)[1].decode())] += 1
    ctx.tally.notes["unknown route answered before its body" if early else "after its body"] += 1


Scenario = Callable[[LoadContext, random.Random], Awaitable[None]]

SCENARIOS: dict[str, tuple[Scenario, int]] = {  # name -> (scenario, weight)
    "chat_stream": (chat_stream, 30),
    "chat": (chat, 12),
    "completion_stream": (completion_stream, 10),
    "completion": (completion, 8),
    "n>1": (n_choices, 8),
    "disconnect": (disconnect, 10),
    "bad": (bad_request, 10),
    "early404": (early_404, 4),
    "big_prompt": (big_prompt, 4),
    "burst": (queue_burst, 2),
}


async def client_loop(ctx: LoadContext, seed: int, deadline: float, think_s: float) -> None:
    """One client: a weighted random scenario after another until `deadline` (trio clock)."""
    rng = random.Random(seed)
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][1] for n in names]
    while trio.current_time() < deadline:
        scenario = SCENARIOS[rng.choices(names, weights)[0]][0]
        await scenario(ctx, rng)
        await trio.sleep(rng.uniform(0.0, think_s))


async def warm_up(ctx: LoadContext, seed: int = 0) -> None:
    """Every scenario once, one after another (lazy imports and first allocations happen here)."""
    rng = random.Random(seed)
    for scenario, _ in SCENARIOS.values():
        await scenario(ctx, rng)


async def run_clients(ctx: LoadContext, clients: int, duration_s: float, think_s: float) -> None:
    """`clients` concurrent client loops for `duration_s`; what is in flight then may finish."""
    deadline = trio.current_time() + duration_s
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client_loop, ctx, i, deadline, think_s)
