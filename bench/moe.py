"""Benchmark mixture-of-experts prefill and decode: tok/s, bytes read per token (active experts
only) and decode against the memory-bandwidth bound of those bytes.

    python bench/moe.py [--layers 2] [--quant q4f32_1,q0f32] [--steps 8] [--experts 128]
                        [--per-token]

Steps of several tokens (prefill, batched decode) run the experts as a grouped GEMM (rows sorted
by expert, each expert's weights read once per step: models/moe_grouped.py); `--per-token` adds
a row per quantization with the per-token gather those steps took before (every (token, slot)
reads its expert's weights), compiled into its own cache folder, on the same weights and
measured in turns with the grouped library (both loaded: twice the weights in memory).

The model is a random-weight Qwen3-30B-A3B layer shape (hidden 2048, 32 q / 4 kv heads of 128,
128 experts of 768, top-8, q/k norms) with fewer layers and a 32,000-token vocabulary, so that
it fits in memory. A decode step at batch 1 reads the attention, router and norm weights, the
output head, and top_k of E experts per layer: `active MB` below. `all-experts MB` is what a
dense-style kernel that touched every expert would read; a measured tok/s above its bound shows
the kernel does not. Bounds: the DRAM read bandwidth (bench/runtime.py's numpy sums over
512 MB). The expert store of the default config (about 760 MB at q4f32_1) exceeds this
Xeon's 300 MB L3, but a share of the experts stays cached between tokens, so a measured rate can
approach or pass the DRAM bound. Figures depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import best_time, print_table
from bench.runtime import read_bandwidth_bytes_s
from mlctrio.models.compile import CompiledModel, compile_model, default_cache_dir
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.moe import per_token_experts
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, random_hf_weights
from mlctrio.runtime.tvm_runner import TVMRunner

DECODE_BATCHES = (1, 4, 8)
PREFILL_LENS = (64, 128)
EXPERT_PARAMS = ("moe_gate_up_proj", "moe_down_proj")
ROUNDS = 3  # turns of every measurement per runner


def qwen3_moe_scaled(layers: int, experts: int, top_k: int) -> LlamaConfig:
    """Qwen3-30B-A3B's layer shape; `layers` of its 48, vocabulary 32,000 of 151,936."""
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        context_window_size=2048,
        model_type="qwen3_moe",
        qk_norm=True,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    )


def step_bytes(named_sizes: list[tuple[str, int]], config: LlamaConfig) -> tuple[int, int]:
    """(bytes a batch-1 decode step reads, bytes if it read every expert): all weights but an
    untied embedding table, expert tensors at top_k / E of their size in the first figure."""
    share = (config.num_experts_per_tok or 1) / (config.num_experts or 1)
    active = total = 0
    for name, n in named_sizes:
        if "embed_tokens" in name and not config.tie_word_embeddings:
            continue
        total += n
        active += int(n * share) if any(p in name for p in EXPERT_PARAMS) else n
    return active, total


def _libraries(
    config: LlamaConfig, quant: str, cache_dir: str | None, per_token: bool
) -> list[tuple[str, CompiledModel]]:
    """(pipeline name, library): as built, and with `per_token` the per-token expert path,
    compiled under <cache>/moe-per-token (the cache key does not see the switch)."""
    libs = [(f"tvm {quant}", compile_model(config, quant, cache_dir=cache_dir))]
    if per_token:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        with per_token_experts():
            cm = compile_model(config, quant, cache_dir=root / "moe-per-token")
        libs.append((f"tvm {quant} per-token", cm))
    return libs


def _prefill(runner: TVMRunner, toks: list[int]) -> None:
    runner.add_sequence(999)  # an id the decode measurements do not use
    runner.step([(999, toks)])
    runner.remove_sequence(999)


def _measure(runners: list[TVMRunner], vocab: int, steps: int) -> list[dict[str, float]]:
    """Prefill (PREFILL_LENS) and decode (DECODE_BATCHES) tok/s of each runner. The runners take
    turns in every one of ROUNDS rounds, so a neighbour's load on a shared machine hits them
    alike; each keeps its best round (after one warm-up call)."""
    rows: list[dict[str, float]] = [{} for _ in runners]
    rng = np.random.default_rng(0)
    for n in PREFILL_LENS:
        toks = rng.integers(0, vocab, n).tolist()
        for runner in runners:
            _prefill(runner, toks)  # warm-up
        for _ in range(ROUNDS):
            for row, runner in zip(rows, runners, strict=True):
                t = best_time(lambda r=runner, p=toks: _prefill(r, p), 1)
                row[f"prefill{n}"] = max(row.get(f"prefill{n}", 0.0), n / t)
    for b in DECODE_BATCHES:
        prompts = [(s, rng.integers(0, vocab, 16).tolist()) for s in range(b)]
        batch = [(s, [int(rng.integers(0, vocab))]) for s in range(b)]
        for runner in runners:
            for s in range(b):
                runner.add_sequence(s)
            runner.step(prompts)
            runner.step(batch)  # warm-up
        for _ in range(ROUNDS):
            for row, runner in zip(rows, runners, strict=True):
                t = best_time(lambda r=runner, x=batch: [r.step(x) for _ in range(steps)], 1)
                row[f"decode_b{b}"] = max(row.get(f"decode_b{b}", 0.0), b * steps / t)
        for runner in runners:
            for s in range(b):
                runner.remove_sequence(s)
    return rows


def bench_quant(
    config: LlamaConfig, quant: str, cache_dir: str | None, steps: int, per_token: bool = False
) -> list[dict]:  # type: ignore[type-arg]
    """One row per library of `quant` (_libraries), all on the same random weights, measured
    side by side (each runner holds its own copy of the weights)."""
    libs = _libraries(config, quant, cache_dir, per_token)
    t0 = time.perf_counter()
    mlc = hf_to_mlc(config, random_hf_weights(config, seed=0, scale=0.02), quant)
    gc.collect()
    params = mlc_to_params(mlc, libs[0][1].params)
    del mlc
    active, total = step_bytes(
        [(i.name, p.nbytes) for i, p in zip(libs[0][1].params, params, strict=True)], config
    )
    runners = [
        TVMRunner(cm.lib_path, params, config, max_num_sequence=max(DECODE_BATCHES),
                  max_total_seq_length=4096, prefill_chunk_size=256)
        for _, cm in libs
    ]  # fmt: skip
    del params
    gc.collect()
    load_s = f"{time.perf_counter() - t0:.1f}"
    rows = [
        {"pipeline": name, "compile_s": "cached" if cm.cache_hit else f"{cm.compile_s:.1f}",
         "load_s": load_s, "active": active, "all": total}
        for name, cm in libs
    ]  # fmt: skip
    for row, measured in zip(rows, _measure(runners, config.vocab_size, steps), strict=True):
        row.update(measured)
    for runner in runners:
        runner.close()
    return rows


def report(rows: list[dict], bandwidth: float, threads: int) -> None:  # type: ignore[type-arg]
    cols = [
        "pipeline", "compile_s", "load_s", *(f"prefill{n}" for n in PREFILL_LENS),
        *(f"decode_b{b}" for b in DECODE_BATCHES),
    ]  # fmt: skip
    print_table("tok/s unless noted", cols, rows, digits=1)
    print(f"\nDRAM read bandwidth {bandwidth / 1e9:.1f} GB/s ({threads} threads)")
    print(
        "pipeline | active MB / token | bound tok/s (active) | decode B1 | measured / bound | "
        "all-experts MB | bound tok/s (all experts)"
    )
    print("---|---|---|---|---|---|---")
    for row in rows:
        active, total, measured = row["active"], row["all"], row["decode_b1"]
        bound = bandwidth / active
        print(
            f"{row['pipeline']} | {active / 1e6:.1f} | {bound:.1f} | {measured:.1f} | "
            f"{measured / bound:.2f} | {total / 1e6:.0f} | {bandwidth / total:.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--quant", default="q4f32_1,q0f32")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-cache", action="store_true", help="compile into a fresh temp dir")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    ap.add_argument(
        "--per-token",
        action="store_true",
        help="also measure the per-token expert path (before the grouped GEMM)",
    )
    args = ap.parse_args(argv)
    config = qwen3_moe_scaled(args.layers, args.experts, args.top_k)
    threads = int(os.environ["TVM_NUM_THREADS"])
    print(
        f"qwen3_moe x{args.layers} layers: {args.experts} experts, top {args.top_k}; "
        f"TVM_NUM_THREADS={threads}, {os.cpu_count()} cores"
    )
    cache_dir = tempfile.mkdtemp() if args.no_cache else args.cache_dir
    rows = [
        row
        for q in args.quant.split(",")
        for row in bench_quant(config, q, cache_dir, args.steps, args.per_token)
    ]
    report(rows, read_bandwidth_bytes_s(threads), threads)


if __name__ == "__main__":
    main()
