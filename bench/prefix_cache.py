"""Benchmark the prefix cache on the real TVM runner: time to first token with a shared prompt.

    python bench/prefix_cache.py [--model demo://tiny] [--system-tokens 1000] [--users 3]

Requests share a ~1,000-token system prompt and differ in a short user suffix; they run one after
another (so each TTFT is one request's prefill plus its first sample, nothing queued). The first
request is cold; the later ones are warm, and with `--prefix-cache-mode radix` they prefill only
their suffix. The last request repeats the first prompt exactly. Each mode loads its own engine.

Prints one row per request and mode, a summary, and whether greedy outputs were identical (radix vs
disable, and the repeated prompt vs its cold run). Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import attrs

from mlctrio.config import EngineOverrides, PrefixCacheMode, ServerConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.runtime.core import EngineCore

SENTENCE = "The quick brown fox jumps over the lazy dog while the engine keeps its pages warm. "


def build_prompts(core: EngineCore, system_tokens: int, users: int) -> list[tuple[int, ...]]:
    tok = core.tokenizer
    system: list[int] = []
    while len(system) < system_tokens:
        system = tok.encode(SENTENCE * (1 + len(system) // 8 + system_tokens // 8))
    system = system[:system_tokens]
    suffixes = [f"\nUser {i}: tell me about topic number {i * 7 + 3}." for i in range(users)]
    prompts = [tuple(system + tok.encode(s)) for s in suffixes]
    return [*prompts, prompts[0]]  # the last one repeats the first exactly


def run_one(
    core: EngineCore, rid: str, prompt: tuple[int, ...], max_tokens: int
) -> dict[str, object]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    core.add_request(GenerationRequest(rid, prompt, params, arrival_time=time.monotonic()))
    ttft = None
    tokens: list[int] = []
    cached = 0
    mirror_ok = True
    while core.has_work():
        outputs = core.step()
        # the scheduler's page mirror must equal TVM's count (forks at any position included)
        mirror_ok &= core.scheduler.pool.num_free == core.runner.free_pages()
        for out in outputs:
            for d in out.deltas:
                tokens.extend(d.token_ids)
            if ttft is None and tokens:
                ttft = time.perf_counter() - t0
            if out.finished:
                cached = out.usage.cached_tokens
    return {
        "ttft_s": ttft,
        "total_s": time.perf_counter() - t0,
        "tokens": tuple(tokens),
        "cached": cached,
        "mirror_ok": mirror_ok,
    }


def build_core(config: ServerConfig) -> EngineCore:
    """The engine core `mlctrio serve` would build for this config (no server)."""
    from mlctrio.runtime.model_loader import load_model

    core, _ = load_model(config)
    print(f"[{config.prefix_cache_mode}] {attrs.asdict(core.config)}")
    return core


def bench_mode(args: argparse.Namespace, mode: PrefixCacheMode) -> list[dict[str, object]]:
    config = ServerConfig(
        model=args.model,
        prefix_cache_mode=mode,
        overrides=EngineOverrides(num_threads=args.threads),
    )
    core = build_core(config)
    try:
        prompts = build_prompts(core, args.system_tokens, args.users)
        # Warm the kernels up on an unrelated prompt (no prefix in common with the system
        # prompt), so the first timed request measures prefill, not first-call overheads.
        run_one(core, "warmup", tuple(core.tokenizer.encode("Warm up! " * 20)), 2)
        rows = []
        for i, prompt in enumerate(prompts):
            row = run_one(core, f"r{i}", prompt, args.max_tokens)
            row.update(mode=mode, request=i, prompt_tokens=len(prompt))
            rows.append(row)
        stats = core.stats()
        print(
            f"[{mode}] query tokens {stats.num_prefix_cache_query_tokens_total}, hit tokens "
            f"{stats.num_prefix_cache_hit_tokens_total}, cached pages {stats.num_cached_pages}"
            f" of {stats.total_pages}, preemptions {stats.num_preemptions_total}"
        )
        return rows
    finally:
        core.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo://tiny")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--users", type=int, default=3, help="distinct user suffixes")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    rows = {mode: bench_mode(args, mode) for mode in ("disable", "radix")}
    print()
    header = ("mode", "req", "kind", "prompt", "cached", "ttft ms", "total ms")
    print("{:8} {:>4} {:6} {:>7} {:>7} {:>9} {:>9}".format(*header))
    for mode, mode_rows in rows.items():
        for row in mode_rows:
            i = int(row["request"])  # type: ignore[call-overload]
            kind = "cold" if i == 0 else ("repeat" if i == len(mode_rows) - 1 else "warm")
            print(
                f"{mode:8} {i:>4} {kind:6} {row['prompt_tokens']:>7} {row['cached']:>7} "
                f"{1000 * float(row['ttft_s']):>9.1f} {1000 * float(row['total_s']):>9.1f}"  # type: ignore[arg-type]
            )
    print()
    for mode, mode_rows in rows.items():
        cold = float(mode_rows[0]["ttft_s"])  # type: ignore[arg-type]
        warm = statistics.median(float(r["ttft_s"]) for r in mode_rows[1:])  # type: ignore[arg-type]
        print(
            f"{mode:8} TTFT cold {1000 * cold:7.1f} ms, warm (median) {1000 * warm:7.1f} ms, "
            f"cold/warm {cold / warm:5.2f}x"
        )
    same_modes = [r["tokens"] for r in rows["radix"]] == [r["tokens"] for r in rows["disable"]]
    radix = rows["radix"]
    same_repeat = radix[0]["tokens"] == radix[-1]["tokens"]
    mirror = all(r["mirror_ok"] for mode_rows in rows.values() for r in mode_rows)
    print(f"page mirror == the runner's free pages after every step: {'yes' if mirror else 'NO'}")
    print(f"greedy outputs identical, radix vs disable: {'yes' if same_modes else 'NO'}")
    print(
        f"greedy outputs identical, repeated prompt warm vs cold: {'yes' if same_repeat else 'NO'}"
    )


if __name__ == "__main__":
    main()
