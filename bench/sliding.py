"""Sliding windows that release KV pages: what a sequence holds, and what decoding costs.

    python bench/sliding.py [--gguf FILE] [--window 256] [--context 1024] [--steps 32]

One GGUF model (default: the embedded SmolLM2-135M-Instruct) at batch 1 with `context` tokens
already in the cache:
  plain                  the model as it is (every layer attends to everything);
  window in kernels only `--overrides sliding_window_size=W` compiled in, the cache built
                         without its sliding mode (keys rotated when written, every position
                         held): what mlctrio did before it released pages;
  cache in sliding mode  the same library as served now: keys rotated inline by held position
                         (docs/discussion/0011), the sequence never slid (a short chat's case);
  pages released         the same, the sequence slid: the pages before the window released.
Prints KV pages held by the sequence, prefill tok/s (the context, in chunks of 512) and decode
tok/s (best of 3). Only ratios between rows of
one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import attrs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_table
from mlctrio.models.artifact import load_params, open_artifact
from mlctrio.models.compile import compile_model
from mlctrio.models.fetch import DEFAULT_EMBEDDED, ensure_embedded
from mlctrio.runtime.tvm_runner import TVMRunner


def measure(art, context: int, steps: int, release: bool, mode: bool = True) -> dict:  # type: ignore[no-untyped-def]
    """`mode` False: the library's cache built without its sliding-window mode (RoPE applied
    when keys are written, every position held): the window only in the kernels."""
    cm = compile_model(art.config, art.quantization)
    config = art.config if mode else attrs.evolve(art.config, layer_types=None)
    runner = TVMRunner(cm.lib_path, load_params(art, cm.params), config,
                       max_num_sequence=1, max_total_seq_length=context + 4 * steps + 64,
                       prefill_chunk_size=512)  # fmt: skip
    rng = np.random.default_rng(0)
    runner.add_sequence(0)
    if release:
        runner.enable_sliding_window(0)
    prompt = rng.integers(0, art.config.vocab_size, context).tolist()
    t0 = time.perf_counter()
    for i in range(0, context, 512):
        runner.step([(0, prompt[i : i + 512])])
    prefill = context / (time.perf_counter() - t0)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step([(0, [int(rng.integers(0, art.config.vocab_size))])])
        best = min(best, time.perf_counter() - t0)
    held = runner.total_pages() - runner.free_pages()
    runner.close()
    return {"pages_held": held, "prefill_tok_s": f"{prefill:.0f}",
            "decode_tok_s": f"{steps / best:.1f}"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="a GGUF file (default: the embedded model)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    path = Path(args.gguf) if args.gguf else ensure_embedded(DEFAULT_EMBEDDED)
    art = open_artifact(path)
    windowed = art.config.with_sliding_window(args.window)
    slid = attrs.evolve(art, config=windowed)
    rows = []
    for name, a, release, mode in (("plain", art, False, False),
                                   ("window in kernels only", slid, False, False),
                                   ("window, cache in sliding mode", slid, False, True),
                                   ("window, pages released", slid, True, True)):  # fmt: skip
        rows.append({"mode": name, **measure(a, args.context, args.steps, release, mode)})
    print_table(f"{path.name}, window {args.window}, {args.context} tokens cached, batch 1",
                ["mode", "pages_held", "prefill_tok_s", "decode_tok_s"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
