"""Time one `Sampler.sample` step for batch sizes 1, 4, 16, 32 at vocab 32000.

Scenarios: all greedy (no logprobs); mixed temperature/top_p/top_k/min_p with some penalties and
a few greedy rows; the mixed batch again with logprobs and top_logprobs=5 on every row. Two logit
shapes: "peaked" (a handful of likely tokens over a N(0, 2²) floor, like a trained LM) and "flat"
(N(0, 3²), a hard case for top_p since the nucleus holds thousands of tokens).

Run: python bench/sampler.py [--steps N]. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import attrs
import numpy as np

from mlctrio.engine.types import SamplingParams
from mlctrio.runtime.sampler import Sampler, make_generator

VOCAB_SIZE = 32000
BATCH_SIZES = (1, 4, 16, 32)
PROMPT_TOKENS = 512
OUTPUT_TOKENS = 128

# Cycled over the rows of a mixed batch: the kinds of requests a chat server sees.
MIXED = (
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.95, top_k=50),
    SamplingParams(temperature=0.8, min_p=0.05, presence_penalty=0.5),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.6, top_p=0.8, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, frequency_penalty=0.3),
)


def peaked_logits(rng: np.random.Generator, num_rows: int) -> np.ndarray:
    logits = (rng.standard_normal((num_rows, VOCAB_SIZE)) * 2.0).astype(np.float32)
    for row in logits:
        likely = rng.choice(VOCAB_SIZE, size=8, replace=False)
        row[likely] += np.linspace(14.0, 7.0, 8, dtype=np.float32)
    return logits


def flat_logits(rng: np.random.Generator, num_rows: int) -> np.ndarray:
    return (rng.standard_normal((num_rows, VOCAB_SIZE)) * 3.0).astype(np.float32)


def with_logprobs(p: SamplingParams) -> SamplingParams:
    return attrs.evolve(p, logprobs=True, top_logprobs=5)


SCENARIOS: dict[str, Callable[[int], list[SamplingParams]]] = {
    "greedy": lambda b: [SamplingParams(temperature=0.0)] * b,
    "mixed": lambda b: [MIXED[i % len(MIXED)] for i in range(b)],
    "mixed+logprobs5": lambda b: [with_logprobs(MIXED[i % len(MIXED)]) for i in range(b)],
}


def time_step(
    sampler: Sampler, logits: np.ndarray, params: list[SamplingParams], steps: int
) -> list[float]:
    rng = np.random.default_rng(1)
    num_rows = len(params)
    prompts = [rng.integers(0, VOCAB_SIZE, PROMPT_TOKENS) for _ in range(num_rows)]
    outputs = [rng.integers(0, VOCAB_SIZE, OUTPUT_TOKENS) for _ in range(num_rows)]
    generators = [make_generator(i, 0) for i in range(num_rows)]
    times_s = []
    for _ in range(steps):
        batch = logits.copy()  # sample() may modify its input; copy outside the timed region
        start = time.perf_counter()
        sampler.sample(batch, params, generators, outputs, prompts)
        times_s.append(time.perf_counter() - start)
    return times_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    sampler = Sampler(VOCAB_SIZE)
    rng = np.random.default_rng(0)
    print(f"vocab {VOCAB_SIZE}, {args.steps} steps each, times per step in microseconds")
    print(f"{'logits':<7} {'scenario':<16} {'B':>3} {'median':>9} {'p90':>9} {'per row':>9}")
    for shape, make in (("peaked", peaked_logits), ("flat", flat_logits)):
        for name, build in SCENARIOS.items():
            for num_rows in BATCH_SIZES:
                logits = make(rng, num_rows)
                params = build(num_rows)
                time_step(sampler, logits, params, 5)  # warm-up
                times_us = [t * 1e6 for t in time_step(sampler, logits, params, args.steps)]
                median = statistics.median(times_us)
                p90 = statistics.quantiles(times_us, n=10)[-1]
                print(
                    f"{shape:<7} {name:<16} {num_rows:>3} {median:>9.0f} {p90:>9.0f}"
                    f" {median / num_rows:>9.0f}"
                )


if __name__ == "__main__":
    main()
