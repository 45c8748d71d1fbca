"""Stock TVM CPU attention kernels vs ours (models/attention_cpu.py) on a whole model, one run.

    python bench/attention.py [--preset small] [--quant q0f32] [--steps 4] [--repeat 2]

Compiles the preset twice (stock kernels into a temporary cache directory, since the compile cache
key does not see the kernel switch; ours into the normal cache) and prints prefill tok/s at
128/512/1024 tokens and decode tok/s at batch 1/4/16 with 1024 tokens of context per sequence.
Each figure is the best of `repeat` runs (the machine is shared: the minimum is the least noisy).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import attrs
import numpy as np

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import best_time, prefill_tok_s, print_table
from mlctrio.models import attention_cpu
from mlctrio.models.compile import compile_model
from mlctrio.models.llama_config import SMALL, TINY, LlamaConfig
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, random_hf_weights
from mlctrio.runtime.tvm_runner import TVMRunner

PRESETS = {"small": SMALL, "tiny": attrs.evolve(TINY, context_window_size=2048)}
PREFILL_LENS = (128, 512, 1024)
DECODE_BATCHES = (1, 4, 16)
CONTEXT = 1024


def bench(config: LlamaConfig, quant: str, stock: bool, steps: int, repeat: int) -> dict:
    row: dict[str, object] = {"kernels": "stock" if stock else "ours"}
    if stock:
        with attention_cpu.stock_kernels():
            cm = compile_model(config, quant, cache_dir=tempfile.mkdtemp(), force=True)
    else:
        cm = compile_model(config, quant)
    row["compile_s"] = "cached" if cm.cache_hit else f"{cm.compile_s:.1f}"
    hf = random_hf_weights(config, seed=0, scale=0.02)
    runner = TVMRunner(
        cm.lib_path,
        mlc_to_params(hf_to_mlc(config, hf, quant), cm.params),
        config,
        max_num_sequence=max(DECODE_BATCHES),
        max_total_seq_length=max(DECODE_BATCHES) * (CONTEXT + 64),
        prefill_chunk_size=max(PREFILL_LENS),
    )
    row.update(prefill_tok_s(runner, config.vocab_size, PREFILL_LENS, repeat))
    rng = np.random.default_rng(0)
    # Every decode batch attends to CONTEXT tokens per sequence: fill 16 sequences once, and pop
    # the decoded tokens after each measurement so the context stays at CONTEXT.
    t0 = time.perf_counter()
    for s in range(max(DECODE_BATCHES)):
        runner.add_sequence(s)
        runner.step([(s, rng.integers(0, config.vocab_size, CONTEXT).tolist())])
    row["fill_s"] = f"{time.perf_counter() - t0:.0f}"
    for b in DECODE_BATCHES:
        batch = [(s, [int(rng.integers(0, config.vocab_size))]) for s in range(b)]

        def _decode(batch: list[tuple[int, list[int]]] = batch) -> None:
            for _ in range(steps):
                runner.step(batch)
            for s, _ in batch:
                runner.popn(s, steps)

        _decode()  # warm-up
        row[f"decode_b{b}"] = b * steps / best_time(_decode, repeat)
    runner.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--quant", default="q0f32")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per measurement")
    ap.add_argument("--repeat", type=int, default=2, help="measurements per figure (best kept)")
    args = ap.parse_args()
    config = PRESETS[args.preset]
    print(
        f"preset {args.preset} {args.quant}: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    rows = [bench(config, args.quant, stock, args.steps, args.repeat) for stock in (True, False)]
    cols = [
        "kernels",
        "compile_s",
        *(f"prefill{n}" for n in PREFILL_LENS),
        *(f"decode_b{b}" for b in DECODE_BATCHES),
        "fill_s",
    ]
    print_table("tok/s (decode: 1024-token context)", cols, rows, digits=1)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
