"""What verifying drafted tokens costs on the CPU: one decode step vs a step that scores k + 1
tokens of one sequence (and of B sequences), in the prefill form (logits gathered after a
`batch_prefill`) and in the rows form (every token one row of the decode function's matmuls),
which TVMRunner uses up to ROWS_FORM_MAX_TOKENS tokens (this script lifts that cap).

    python bench/verify_forms.py [--model embedded://SmolLM2-135M-Instruct] [--activations f32]
        [--repeat 20] [--threads 2]

Prints ms per step (median of --repeat) for each (sequences, tokens each) and form. Figures
depend on the machine and its load: compare columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.runtime.model_loader import load_model


def timed(runner, form: bool | None, batch: list[tuple[int, list[int]]], repeat: int) -> float:
    """Median ms of scoring `batch` (every token's logits) in the rows form (`form` True), the
    prefill form (False) or as the runner chooses (None)."""
    if form is not None:
        runner.rows_form_max = 1 << 20 if form else 0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        runner.score(batch, [len(t) for _, t in batch])
        times.append(time.perf_counter() - t0)
        for sid, tokens in batch:
            runner.popn(sid, len(tokens))
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded://SmolLM2-135M-Instruct")
    ap.add_argument("--activations", default="auto")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    overrides = EngineOverrides(num_threads=args.threads, max_num_sequence=8)
    config = ServerConfig(model=args.model, activations=args.activations, overrides=overrides)
    core, _ = load_model(config)
    runner = core.runner
    for sid in range(8):
        runner.add_sequence(sid)
        runner.step([(sid, [(17 * sid + i) % 1000 + 100 for i in range(200)])])
    print(f"{args.model} ({args.activations} activations), {args.threads} threads, "
          f"200-token contexts, ms per step (median of {args.repeat})")  # fmt: skip
    print("| sequences | tokens each | decode x1 | prefill form | rows form | rows/prefill |")
    print("|--:|--:|--:|--:|--:|--:|")
    one = [(0, [500])]
    decode = timed(runner, True, one, args.repeat)
    for seqs in (1, 2, 4):
        for each in (1, 2, 3, 4, 5, 7, 9):
            if seqs * each == 1:
                continue
            batch = [(sid, [300 + i for i in range(each)]) for sid in range(seqs)]
            pre = timed(runner, False, batch, args.repeat)
            rows = timed(runner, True, batch, args.repeat)
            print(f"| {seqs} | {each} | {decode:.1f} | {pre:.1f} | {rows:.1f} | {rows / pre:.2f} |")
    core.close()


if __name__ == "__main__":
    main()
