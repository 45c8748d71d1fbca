"""A bounded soak: minutes of mixed load on one `mlctrio serve`, watching for leaks.

    python bench/soak.py                              # mock://echo?delay_ms=5, 10 minutes
    python bench/soak.py --minutes 2 --clients 8 --plot-out soak.png
    python bench/soak.py --model demo://tiny          # the real TVM engine (compiles first)
    python bench/soak.py --model embedded://SmolLM2-135M-Instruct --api-key sk-soak
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234   # a server already running

Starts the server (`--mode server`, `--max-queued-requests 16` so bursts reach the queue limit),
runs `--clients` concurrent clients for `--minutes` (the scenarios are in bench/soak_load.py),
and every `--sample-s` seconds samples the server process (VmRSS, open descriptors, sockets in
CLOSE-WAIT, threads from /proc) and the /metrics gauges (running, waiting, KV-cache usage). Then
it closes its connections, waits for the server to go idle, and prints: the samples (condensed),
the growth (median of the first third of the samples vs the last third) of RSS, descriptors and
threads, the responses by scenario and status, streams that got a 200 but no complete end,
connection errors, and the gauges once idle.

Descriptors are counted without sockets in CLOSE-WAIT: Hypercorn's trio server keeps a
connection its client closed open until its keep-alive timeout (`KEEP_ALIVE_TIMEOUT_S` in
mlctrio/serve.py), so those come and go with the load; they are shown in their own column.

Exit status 1 when an invariant breaks (bench/soak_checks.py `check_invariants`): a truncated
stream, a 5xx other than 503, an error without an OpenAI envelope, a connection error, KV pages
or requests still held once idle, idle descriptors growing past `--max-fd-growth` (before vs
after the load; under load only with `--max-load-fd-growth`), RSS growing past
`--max-rss-growth-mb` when given, or the server dying.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import _stop, _wait_healthy, free_port, mlctrio_serve_cmd, print_table
from bench.soak_checks import (
    GAUGES,
    Ending,
    Limits,
    Sample,
    Tally,
    check_invariants,
    condense,
    growth,
    parse_metrics,
    read_proc,
)
from bench.soak_load import LoadContext, run_clients, warm_up

DEFAULT_MODEL = "mock://echo?delay_ms=5"
IDLE_GAUGES = ("mlctrio_num_requests_running", "mlctrio_num_requests_waiting",
               "mlctrio_kv_cache_usage_ratio")  # fmt: skip


@contextmanager
def started_server(
    model: str, extra: Sequence[str], timeout_s: float
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`mlctrio serve MODEL` on a free port; yields (url, process); stopped and reaped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        cmd = mlctrio_serve_cmd(model, port, extra)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        try:
            _wait_healthy(url, proc, timeout_s)
            print(f"{model}: healthy {time.monotonic() - started:.1f} s after start", flush=True)
            yield url, proc
        except RuntimeError as exc:  # it never became healthy
            _stop(proc)
            log.seek(0)
            tail = log.read()[-4000:].decode(errors="replace")
            raise SystemExit(f"{exc}:\n{tail}") from None
        finally:
            _stop(proc)
            if proc.returncode:  # it died, or did not stop cleanly: show why
                log.seek(0)
                tail = log.read()[-3000:].decode(errors="replace").strip()
                print(f"\nserver exited with {proc.returncode}; log (tail):\n{tail}")


async def gauges(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        response = await client.get("/metrics", timeout=10)
    except httpx.TransportError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


async def take_sample(client: httpx.AsyncClient, pid: int, t0: float, ctx: LoadContext) -> Sample:
    rss_kb, fds, threads, close_wait = read_proc(pid)
    found = await gauges(client) or {}
    return Sample(
        round(trio.current_time() - t0, 1),
        rss_kb,
        fds,
        threads,
        close_wait,
        {GAUGES[k]: v for k, v in found.items()},
        ctx.done,
    )


async def sampler(
    client: httpx.AsyncClient, pid: int, t0: float, ctx: LoadContext, every_s: float,
    out: list[Sample],
) -> None:  # fmt: skip
    """A sample every `every_s` seconds until cancelled."""
    while True:
        try:
            out.append(await take_sample(client, pid, t0, ctx))
        except OSError:  # the process is gone: the ending says so
            return
        await trio.sleep(every_s)


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> dict[str, float] | None:
    """The gauges once nothing runs, waits or holds KV pages; the last ones read at the timeout
    (None when /metrics never answered)."""
    last = None
    with trio.move_on_after(timeout_s):
        while True:
            last = await gauges(client) or last
            if last is not None and all(last.get(k, 0.0) == 0 for k in IDLE_GAUGES):
                break
            await trio.sleep(0.2)
    return last


def open_fds(pid: int) -> tuple[int, int]:
    """(descriptors not in CLOSE-WAIT, sockets in CLOSE-WAIT) of the server."""
    _, fds, _, close_wait = read_proc(pid)
    return fds - close_wait, close_wait


async def wait_fds(pid: int, at_most: int, timeout_s: float) -> tuple[int, int]:
    """`open_fds` once the first is `at_most` or fewer (a connection its client closed takes the
    server a moment to notice), or at the timeout."""
    with trio.move_on_after(timeout_s):
        while open_fds(pid)[0] > at_most:
            await trio.sleep(0.1)
    return open_fds(pid)


async def soak(args: argparse.Namespace, url: str, pid: int) -> tuple[Tally, list[Sample], Ending]:
    parts = urlsplit(url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as watcher:
        model = (await watcher.get("/v1/models")).json()["data"][0]["id"]
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        async with httpx.AsyncClient(base_url=url, limits=limits) as warm_client:
            warm = LoadContext(warm_client, model, host, port, args.api_key, burst=args.burst)
            await warm_up(warm)
        await wait_idle(watcher, args.idle_timeout)
        fds_before = open_fds(pid)[0]
        async with httpx.AsyncClient(base_url=url, limits=limits) as load_client:
            ctx = LoadContext(
                load_client, model, host, port, args.api_key,
                burst=args.burst, big_prompt_chars=args.big_prompt_chars,
            )  # fmt: skip
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler, watcher, pid, t0, ctx, args.sample_s, samples)
                await run_clients(ctx, args.clients, args.minutes * 60, args.think_s)
                nursery.cancel_scope.cancel()
        ctx.tally.truncated[:0] = warm.tally.truncated  # a warm-up failure still counts
        idle = await wait_idle(watcher, args.idle_timeout)
        fds_after, close_wait = await wait_fds(pid, fds_before, 10.0)
        samples.append(await take_sample(watcher, pid, t0, ctx))
        if idle is not None and any(idle.get(k, 0.0) for k in IDLE_GAUGES):
            # Stale gauges (updated once per engine step) or a real leak? One more request tells.
            body = {"model": model, "prompt": "probe", "max_tokens": 1}
            with contextlib.suppress(httpx.TransportError):
                await watcher.post("/v1/completions", json=body)
            probe = await wait_idle(watcher, args.idle_timeout)
            print(f"after one more request, idle gauges: {probe}")
    return ctx.tally, samples, Ending(idle, fds_before, fds_after, True, close_wait)


def report(tally: Tally, samples: Sequence[Sample], ending: Ending) -> None:
    rows: list[dict[str, object]] = [
        {
            "t s": s.t_s,
            "RSS MB": s.rss_kb / 1024,
            "fds": s.fds,
            "close-wait": s.close_wait,
            "threads": s.threads,
            **{k: f"{v:g}" for k, v in s.gauges.items()},
            "done": s.requests_done,
        }
        for s in condense(samples, 20)
    ]
    cols = [
        "t s",
        "RSS MB",
        "fds",
        "close-wait",
        "threads",
        "running",
        "waiting",
        "kv_usage",
        "done",
    ]
    print_table("samples", cols, rows, digits=1)
    print(
        f"\n{len(samples)} samples; growth = median of the last third - median of the first third"
    )
    for name, values, scale, unit in (
        ("RSS", [s.rss_kb for s in samples], 1024, " MB"),
        ("fds (without CLOSE-WAIT)", [s.fds - s.close_wait for s in samples], 1, ""),
        ("sockets in CLOSE-WAIT", [s.close_wait for s in samples], 1, ""),
        ("threads", [s.threads for s in samples], 1, ""),
    ):
        g = growth(values)
        if g is not None:
            print(f"  {name}: {g.first / scale:.1f} -> {g.last / scale:.1f}{unit} "
                  f"({g.delta / scale:+.1f}{unit})")  # fmt: skip
    statuses = sorted({s for _, s in tally.statuses})
    kinds = sorted({k for k, _ in tally.statuses})
    by_kind: list[dict[str, object]] = [
        {"kind": k, **{s: tally.statuses.get((k, s), 0) for s in statuses}} for k in kinds
    ]
    print(f"\nresponses by status ({tally.total} requests)")
    print_table("responses", ["kind", *statuses], by_kind)
    for label, items in (
        ("streams with a 200 but no complete end", tally.truncated),
        ("error responses without an envelope", tally.bad_envelopes),
        ("responses of the wrong shape", tally.malformed),
    ):
        print(f"{label}: {len(items)}")
        for item in items[:10]:
            print(f"  {item}")
    print(f"connection errors: {sum(tally.conn_errors.values())} {dict(tally.conn_errors)}")
    for example in tally.conn_error_examples:
        print(f"  {example}")
    for note, n in sorted(tally.notes.items()):
        print(f"{note}: {n}")
    print(f"idle after the load, /metrics: {ending.idle_gauges}")
    print(
        f"idle descriptors (without CLOSE-WAIT) before / after the load: {ending.fds_before} / "
        f"{ending.fds_after}; sockets still in CLOSE-WAIT: {ending.close_wait_after} (connections"
        " their clients closed, which the server should close at once)"
    )


def plot(samples: Sequence[Sample], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    t = [s.t_s for s in samples]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(8, 9))
    series = [
        ("RSS MB", [s.rss_kb / 1024 for s in samples]),
        ("open fds", [s.fds for s in samples]),
        ("threads", [s.threads for s in samples]),
        ("KV usage", [s.gauges.get("kv_usage", float("nan")) for s in samples]),
    ]
    for ax, (label, values) in zip(axes, series, strict=True):
        ax.plot(t, values)
        ax.set_ylabel(label)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--think-s", type=float, default=0.05, help="max pause between requests")
    p.add_argument("--burst", type=int, default=40, help="requests fired by one queue burst")
    p.add_argument("--max-queued-requests", type=int, default=16)
    p.add_argument("--big-prompt-chars", type=int, default=3000)
    p.add_argument("--api-key", default=None, help="start the server with this key")
    p.add_argument("--idle-timeout", type=float, default=15.0)
    p.add_argument("--max-fd-growth", type=float, default=10.0)
    p.add_argument(
        "--max-load-fd-growth", type=float, default=None, help="under load; default: reported"
    )
    p.add_argument("--max-rss-growth-mb", type=float, default=None)
    p.add_argument("--max-conn-errors", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=None, help="default 60 s, real 900")
    p.add_argument("--url", default=None, help="soak a running server (needs --pid)")
    p.add_argument("--pid", type=int, default=None)
    p.add_argument("--plot-out", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    if args.url:
        if args.pid is None:
            raise SystemExit("--url needs --pid (the server process to sample)")
        tally, samples, ending = trio.run(soak, args, args.url, args.pid)
        alive = Path(f"/proc/{args.pid}").exists()
    else:
        extra = ["--max-queued-requests", str(args.max_queued_requests)]
        extra += ["--api-key", args.api_key] if args.api_key else []
        timeout = args.startup_timeout or (60.0 if args.model.startswith("mock://") else 900.0)
        with started_server(args.model, extra, timeout) as (url, proc):
            tally, samples, ending = trio.run(soak, args, url, proc.pid)
            alive = proc.poll() is None
    ending = dataclasses.replace(ending, server_alive=alive)
    report(tally, samples, ending)
    if args.plot_out:
        plot(samples, args.plot_out)
    limits = Limits(
        args.max_fd_growth, args.max_load_fd_growth, args.max_rss_growth_mb, args.max_conn_errors
    )
    broken = check_invariants(tally, samples, ending, limits)
    print(f"\nsoak of {args.model if not args.url else args.url}: "
          f"{time.monotonic() - started:.0f} s, median RSS "
          f"{statistics.median(s.rss_kb for s in samples) / 1024:.0f} MB")  # fmt: skip
    for line in broken:
        print(f"BROKEN: {line}")
    print("PASS" if not broken else f"FAIL ({len(broken)} invariants broken)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
