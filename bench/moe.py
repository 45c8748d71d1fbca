"""Benchmark mixture-of-experts decode: bytes read per token (active experts only) and tok/s
against the memory-bandwidth bound of those bytes.

    python bench/moe.py [--layers 2] [--quant q4f32_1,q0f32] [--steps 8] [--experts 128]

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

from bench._common import best_time, prefill_tok_s, print_table
from bench.runtime import read_bandwidth_bytes_s
from mlctrio.models.compile import compile_model
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, random_hf_weights
from mlctrio.runtime.tvm_runner import TVMRunner

DECODE_BATCHES = (1, 4, 8)
PREFILL_LENS = (64,)
EXPERT_PARAMS = ("moe_gate_up_proj", "moe_down_proj")


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


def bench_quant(config: LlamaConfig, quant: str, cache_dir: str | None, steps: int) -> dict:
    row: dict[str, object] = {"pipeline": f"tvm {quant}"}
    cm = compile_model(config, quant, cache_dir=cache_dir)
    row["compile_s"] = "cached" if cm.cache_hit else f"{cm.compile_s:.1f}"
    t0 = time.perf_counter()
    mlc = hf_to_mlc(config, random_hf_weights(config, seed=0, scale=0.02), quant)
    gc.collect()
    params = mlc_to_params(mlc, cm.params)
    del mlc
    runner = TVMRunner(
        cm.lib_path, params, config, max_num_sequence=max(DECODE_BATCHES),
        max_total_seq_length=4096, prefill_chunk_size=256,
    )  # fmt: skip
    row["load_s"] = f"{time.perf_counter() - t0:.1f}"
    row["active"], row["all"] = step_bytes(
        [(i.name, p.nbytes) for i, p in zip(cm.params, params, strict=True)], config
    )
    del params
    gc.collect()
    row.update(prefill_tok_s(runner, config.vocab_size, PREFILL_LENS, 2))
    rng = np.random.default_rng(0)
    for b in DECODE_BATCHES:
        for s in range(b):
            runner.add_sequence(s)
        runner.step([(s, rng.integers(0, config.vocab_size, 16).tolist()) for s in range(b)])
        batch = [(s, [int(rng.integers(0, config.vocab_size))]) for s in range(b)]
        runner.step(batch)  # warm-up
        t = best_time(lambda batch=batch: [runner.step(batch) for _ in range(steps)], 2)
        row[f"decode_b{b}"] = b * steps / t
        for s in range(b):
            runner.remove_sequence(s)
    runner.close()
    return row


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
    args = ap.parse_args(argv)
    config = qwen3_moe_scaled(args.layers, args.experts, args.top_k)
    threads = int(os.environ["TVM_NUM_THREADS"])
    print(
        f"qwen3_moe x{args.layers} layers: {args.experts} experts, top {args.top_k}; "
        f"TVM_NUM_THREADS={threads}, {os.cpu_count()} cores"
    )
    cache_dir = tempfile.mkdtemp() if args.no_cache else args.cache_dir
    rows = [bench_quant(config, q, cache_dir, args.steps) for q in args.quant.split(",")]
    report(rows, read_bandwidth_bytes_s(threads), threads)


if __name__ == "__main__":
    main()
