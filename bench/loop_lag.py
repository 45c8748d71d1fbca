"""Event-loop lag while the engine decodes: is the trio loop still responsive?

A 1 ms ticker runs on the trio loop while the worker thread decodes batches of requests with the
real TVM runner (TVM releases the GIL during kernels). Prints how late the ticker woke up (p50,
p99, max) when idle and while decoding at several batch sizes.

    python bench/loop_lag.py [--model demo://small] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from mlctrio.config import ServerConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.loader import core_factory
from mlctrio.service import AsyncEngine, serve_engine, stop_engine


async def ticker(lags: list[float], stop: trio.Event) -> None:
    period = 0.001
    while not stop.is_set():
        start = time.perf_counter()
        await trio.sleep(period)
        lags.append(time.perf_counter() - start - period)


async def measure(engine: AsyncEngine, batch: int, tokens: int) -> tuple[list[float], float]:
    lags: list[float] = []
    stop = trio.Event()
    requests = [
        GenerationRequest(
            f"lag-{batch}-{i}-{time.monotonic_ns()}",
            tuple(range(10, 42)),
            SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
        )
        for i in range(batch)
    ]
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker, lags, stop)
        if batch:
            async with engine.generate(requests) as stream:
                while await stream.receive() is not None:
                    pass
        else:
            await trio.sleep(1.0)
        stop.set()
    return lags, time.perf_counter() - t0


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


async def main(model: str, tokens: int) -> None:
    config = ServerConfig(model=model, mode="server")
    engine = AsyncEngine(256, core_factory(config))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_engine, engine)
        while engine.info is None:
            await trio.sleep(0.05)
        print(f"model {model}, {tokens} tokens per request, 1 ms ticker on the trio loop\n")
        print(
            f"{'batch':>5} {'tok/s':>8} {'ticks':>6} {'lag p50 ms':>11} {'p99 ms':>8} {'max ms':>8}"
        )
        for batch in (0, 1, 4, 16):
            lags, elapsed = await measure(engine, batch, tokens)
            rate = batch * tokens / elapsed if batch else 0.0
            print(
                f"{batch:>5} {rate:>8.1f} {len(lags):>6} {_ms(lags, 0.5):>11.3f} "
                f"{_ms(lags, 0.99):>8.3f} {1000 * max(lags):>8.3f}"
            )
        print(f"\nmean lag while decoding: {1000 * statistics.mean(lags):.3f} ms")
        stop_engine(engine)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo://small")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    trio.run(main, args.model, args.tokens)
