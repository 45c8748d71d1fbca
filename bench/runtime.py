"""Benchmark the TVM runtime: compile, load, prefill, decode tok/s, and decode at batch 1 against
the memory-bandwidth bound.

    python bench/runtime.py [--preset small] [--quant q0f32,q4f32_1] [--no-cache] [--steps 8]
    python bench/runtime.py --gguf A.gguf,B.gguf [--activations f32,q8]   # real GGUF files
    python bench/runtime.py --moe [--layers 4 --quant q4f32_1]   # MoE: active-expert bytes/token

Prints one table row per quantization (or GGUF file and activation mode) plus the numpy/OpenBLAS
reference (same forward, f32, all cores; random-weight presets only) for scale. Figures depend on
the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import best_time, prefill_tok_s, print_table
from mlctrio.models.artifact import load_mlc_named, open_artifact
from mlctrio.models.compile import compile_model
from mlctrio.models.llama_config import SMALL, TINY, LlamaConfig
from mlctrio.models.quantization import get_quantization
from mlctrio.models.reference import ReferenceLlama
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, random_hf_weights
from mlctrio.runtime.tvm_library import set_openblas_threads
from mlctrio.runtime.tvm_runner import TVMRunner

PRESETS = {"small": SMALL, "tiny": TINY}
PREFILL_LENS = (128, 512)
DECODE_BATCHES = (1, 4, 8, 16, 32, 64)
DECODE_CONTEXT = 16  # tokens each sequence holds before the decode steps are timed


def bench_tvm(config: LlamaConfig, quant: str, hf: dict, cache_dir: str, steps: int) -> dict:
    return bench_named(f"tvm {quant}", config, quant, lambda: hf_to_mlc(config, hf, quant),
                       cache_dir, steps)  # fmt: skip


def bench_gguf(path: str, activations: str, cache_dir: str | None, steps: int) -> dict:
    art = open_artifact(path, activations=activations)
    label = f"{Path(path).name} act={activations}"
    return bench_named(label, art.config, art.quantization, lambda: load_mlc_named(art),
                       cache_dir, steps)  # fmt: skip


def bench_named(
    label: str, config: LlamaConfig, quant: str, weights: Callable[[], dict], cache_dir: str | None,
    steps: int,
) -> dict:  # fmt: skip
    row: dict[str, object] = {"pipeline": label}
    cm = compile_model(config, quant, cache_dir=cache_dir)
    row["compile_s"] = "cached" if cm.cache_hit else f"{cm.compile_s:.1f}"
    t0 = time.perf_counter()
    params = mlc_to_params(weights(), cm.params)
    runner = TVMRunner(
        cm.lib_path,
        params,
        config,
        max_num_sequence=max(DECODE_BATCHES),
        max_total_seq_length=8192,
        prefill_chunk_size=max(*PREFILL_LENS, DECODE_CONTEXT * max(DECODE_BATCHES)),
    )
    row["load_s"] = f"{time.perf_counter() - t0:.2f}"
    # A decode step reads every weight once, except the embedding table: only the batch's rows of
    # it (unless the output head is tied to it, which then reads it whole as the head).
    row["weight_bytes"] = decode_weight_bytes(
        [(info.name, p.nbytes) for info, p in zip(cm.params, params, strict=True)], config
    )
    row.update(prefill_tok_s(runner, config.vocab_size, PREFILL_LENS, 2))
    rng = np.random.default_rng(0)
    for b in DECODE_BATCHES:
        for s in range(b):
            runner.add_sequence(s)
        runner.step(
            [(s, rng.integers(0, config.vocab_size, DECODE_CONTEXT).tolist()) for s in range(b)]
        )
        batch = [(s, [int(rng.integers(0, config.vocab_size))]) for s in range(b)]
        runner.step(batch)  # warm-up
        t = best_time(lambda batch=batch: [runner.step(batch) for _ in range(steps)], 2)
        row[f"decode_b{b}"] = b * steps / t
        for s in range(b):
            runner.remove_sequence(s)
    runner.close()
    return row


def bench_numpy(config: LlamaConfig, hf: dict, steps: int) -> dict:
    set_openblas_threads(os.cpu_count() or 1)
    row: dict[str, object] = {"pipeline": "numpy/OpenBLAS f32", "compile_s": "-"}
    t0 = time.perf_counter()
    ref = ReferenceLlama(config, hf_to_mlc(config, hf, "q0f32"), get_quantization("q0f32"))
    row["load_s"] = f"{time.perf_counter() - t0:.2f}"
    rng = np.random.default_rng(0)
    for n in PREFILL_LENS:
        toks = rng.integers(0, config.vocab_size, n).tolist()

        def _prefill(toks: list[int] = toks) -> None:
            cache = ref.new_cache()
            cache.add_sequence(0)
            ref.forward(cache, 0, toks)

        row[f"prefill{n}"] = n / best_time(_prefill, 2)
    cache = ref.new_cache()
    cache.add_sequence(0)
    ref.forward(cache, 0, rng.integers(0, config.vocab_size, DECODE_CONTEXT).tolist())
    tok = [int(rng.integers(0, config.vocab_size))]
    row["decode_b1"] = steps / best_time(
        lambda: [ref.forward(cache, 0, tok) for _ in range(steps)], 2
    )
    row["weight_bytes"] = decode_weight_bytes([(k, a.nbytes) for k, a in hf.items()], config)
    set_openblas_threads(1)
    return row


def decode_weight_bytes(named_sizes: list[tuple[str, int]], config: LlamaConfig) -> int:
    """Bytes of weights one decode step reads: all but an untied embedding table."""
    if config.tie_word_embeddings:
        return sum(n for _, n in named_sizes)
    return sum(n for name, n in named_sizes if "embed_tokens" not in name)


def read_bandwidth_bytes_s(threads: int, size_bytes: int = 512 << 20, repeat: int = 5) -> float:
    """Bytes per second `threads` threads read (numpy sums over disjoint slices; numpy releases
    the GIL in reductions). Decode streams weights with TVM_NUM_THREADS threads: this is the bound
    that matters for it."""
    data = np.ones(size_bytes // 4, dtype=np.float32)
    parts = np.array_split(data, threads)

    def _read() -> None:
        pool = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    return data.nbytes / min(_timed(_read) for _ in range(repeat))


def memory_bandwidth_bytes_s(size_bytes: int = 512 << 20, repeat: int = 5) -> float:
    """A STREAM-like copy: bytes read + written per second by numpy (best of `repeat`).

    numpy's copy is single-threaded; decode reads weights with TVM_NUM_THREADS threads, so this is
    a conservative (low) bound on what the cores can stream, not the DRAM peak.
    """
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return 2 * src.nbytes / best


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_roofline(rows: list[dict], bandwidth: float, copy: float, threads: int) -> None:  # type: ignore[type-arg]
    """Decode at batch 1 against the memory-bandwidth bound: weight bytes read per step.

    Two bounds: the DRAM read bandwidth (numpy sums over 512 MB) and the read bandwidth over a
    buffer as large as the weights, which differs when the weights fit the last-level cache
    (this Xeon's L3 is 300 MB: a 100 MB model streams from cache, faster than from DRAM)."""
    print(
        f"\nroofline: measured read bandwidth {bandwidth / 1e9:.1f} GB/s ({threads} threads, "
        f"numpy sums over 512 MB; the DRAM bound) and copy bandwidth {copy / 1e9:.1f} GB/s "
        "(1 thread)"
    )
    print(
        "pipeline | weight MB read per decode step | DRAM bound tok/s (B=1) | same-size-buffer "
        "bound tok/s | decode B1 | bound/measured (DRAM, same-size)"
    )
    print("---|---|---|---|---|---")
    for row in rows:
        nbytes = row.get("weight_bytes")
        measured = row.get("decode_b1")
        if not isinstance(nbytes, int) or not isinstance(measured, float):
            continue
        bound = bandwidth / nbytes
        sized = read_bandwidth_bytes_s(threads, size_bytes=nbytes) / nbytes
        print(
            f"{row['pipeline']} | {nbytes / 1e6:.0f} | {bound:.0f} | {sized:.0f} | "
            f"{measured:.0f} | {bound / measured:.2f}x, {sized / measured:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--quant", default="q0f32,q4f32_1")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-cache", action="store_true", help="compile into a fresh temp dir")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    ap.add_argument("--no-reference", action="store_true", help="skip the numpy reference row")
    ap.add_argument("--gguf", default=None, help="comma-separated GGUF files instead of a preset")
    ap.add_argument("--activations", default="f32,q8", help="with --gguf: f32, q8 or both")
    ap.add_argument(
        "--moe",
        nargs=argparse.REMAINDER,
        help="the mixture-of-experts table instead: bytes read per token by the active experts "
        "and tok/s against that bandwidth bound (bench/moe.py, which takes the rest of the "
        "arguments: --layers, --experts, --top-k, --quant, --steps, --per-token)",
    )
    args = ap.parse_args()
    if args.moe is not None:
        from bench import moe

        moe.main(args.moe)
        return
    if args.gguf:
        rows = [
            bench_gguf(path, act, args.cache_dir, args.steps)
            for path in args.gguf.split(",")
            for act in args.activations.split(",")
        ]
        report(rows)
        return
    config = PRESETS[args.preset]
    hf = random_hf_weights(config, seed=0, scale=0.02)
    n_params = sum(a.size for a in hf.values())
    print(
        f"preset {args.preset}: {n_params / 1e6:.0f}M params, TVM_NUM_THREADS="
        f"{os.environ['TVM_NUM_THREADS']}, {os.cpu_count()} cores"
    )
    cache_dir = tempfile.mkdtemp() if args.no_cache else args.cache_dir
    rows = [] if args.no_reference else [bench_numpy(config, hf, args.steps)]
    rows += [bench_tvm(config, q, hf, cache_dir, args.steps) for q in args.quant.split(",")]
    report(rows)


def report(rows: list[dict]) -> None:  # type: ignore[type-arg]
    cols = [
        "pipeline",
        "compile_s",
        "load_s",
        *(f"prefill{n}" for n in PREFILL_LENS),
        *(f"decode_b{b}" for b in DECODE_BATCHES),
    ]
    print_table("tok/s unless noted", cols, rows, digits=0)
    threads = int(os.environ["TVM_NUM_THREADS"])
    print_roofline(rows, read_bandwidth_bytes_s(threads), memory_bandwidth_bytes_s(), threads)


if __name__ == "__main__":
    main()
