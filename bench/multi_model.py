"""Two models decoding at the same time in one process: how to share the CPU between their engines.

    python bench/multi_model.py [--models demo://small,demo://small] [--batch 4] [--seconds 3]
                                [--variants split,all,lock,alone-split,alone-all] [--rounds 2]

Each engine runs its model on its own worker thread, and TVM's thread pool belongs to the thread
that launches the kernels (sized from TVM_NUM_THREADS when that thread first runs one). Variants,
each in a fresh process (so the pools are sized as the variant says):

    split        every engine's pool cores // N threads (mlctrio's default with N models)
    all          every engine's pool all the cores (N pools on the same cores)
    lock         all the cores, and a process-wide lock around each engine step (one model
                 computes at a time)
    alone-split  the first model busy, the others idle (not loaded), with split's threads
    alone-all    the same with every core: what a lone busy model loses under split

Every engine keeps `--batch` greedy requests decoding (EOS ignored; a finished one is replaced
at once) for the same `--seconds` window. The table gives the aggregate output tok/s in the
window, each model's TPOT (the window over its steps: one token per request a step), and the
aggregate relative to `split` in the same run. "OS threads": the process's threads while the
engines decode (a pool of T threads adds T - 1 workers to the engine thread that owns it).
Rounds alternate the variants, so a neighbour's load hits them alike; each variant's best round
is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `mlctrio` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("split", "all", "lock", "alone-split", "alone-all")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _request(name: str, k: int, tokens: int, prompt_len: int) -> Any:
    from mlctrio.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    prompt = tuple(100 + (7 * k + 13 * i) % 900 for i in range(prompt_len))
    return GenerationRequest(f"{name}-{k}", prompt, params, time.monotonic())


def _run(
    core: Any, name: str, args: argparse.Namespace, lock: threading.Lock | None, until: float
) -> dict[str, float]:
    """Keep `args.batch` requests decoding on `core` (a finished one is replaced at once) until
    `until`; the tokens made and the steps taken (each step: one token per request)."""
    made = steps = 0
    for k in range(args.batch):
        core.add_request(_request(name, k, args.tokens, args.prompt))
    started = args.batch
    while time.perf_counter() < until:
        if lock is None:
            outputs = core.step()
        else:
            with lock:
                outputs = core.step()
        steps += 1
        for out in outputs:
            made += sum(len(d.token_ids) for d in out.deltas)
            if out.finished:
                core.add_request(_request(name, started, args.tokens, args.prompt))
                started += 1
    while core.has_work():  # let the engine end cleanly (not measured)
        for out in core.step():
            if not out.finished:
                core.abort_request(out.request_id)
    return {"tokens": made, "steps": steps}


def child(args: argparse.Namespace) -> None:
    """One variant in this process: load, warm up each engine thread, decode together."""
    from mlctrio.config import EngineOverrides, ServerConfig
    from mlctrio.runtime.model_loader import load_model

    models = args.models.split(",")
    if args.child.startswith("alone"):
        models = models[:1]
    overrides = EngineOverrides(max_num_sequence=args.batch, prefill_chunk_size=256)
    cores = [load_model(ServerConfig(model=m, overrides=overrides))[0] for m in models]
    lock = threading.Lock() if args.child == "lock" else None
    results: list[dict[str, float]] = [{} for _ in cores]
    warm = threading.Barrier(len(cores))
    os_threads = [0]
    window: list[float] = []

    def engine(k: int) -> None:
        core = cores[k]
        _run(core, f"warm{k}", args, lock, time.perf_counter() + 0.2)  # this thread's pool
        if warm.wait() == 0:  # every engine thread and its pool exist now
            os_threads[0] = len(os.listdir("/proc/self/task"))
            window.append(time.perf_counter() + args.seconds)
        warm.wait()
        results[k] = _run(core, f"m{k}", args, lock, window[0])

    threads = [threading.Thread(target=engine, args=(k,)) for k in range(len(cores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "variant": args.child,
                "tvm_threads": int(os.environ["TVM_NUM_THREADS"]),
                "os_threads": os_threads[0],
                "tok_s": sum(r["tokens"] for r in results) / args.seconds,
                "tpot_ms": [args.seconds / max(1, r["steps"]) * 1e3 for r in results],
            }
        )
    )


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    n = len(args.models.split(","))
    threads = max(1, cpu_count() // n) if variant.endswith("split") else cpu_count()
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    argv = [sys.executable, __file__, "--child", variant, "--models", args.models,
            "--batch", str(args.batch), "--tokens", str(args.tokens),
            "--prompt", str(args.prompt), "--seconds", str(args.seconds)]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="demo://small,demo://small")
    parser.add_argument("--batch", type=int, default=4, help="requests per model")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--seconds", type=float, default=3.0, help="the measured window")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    variants = args.variants.split(",")
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for variant in variants:
            result = run_variant(variant, args)
            if variant not in best or result["tok_s"] > best[variant]["tok_s"]:
                best[variant] = result
    base = best.get("split", next(iter(best.values())))["tok_s"]
    names = args.models.split(",")
    rows = []
    for variant in variants:
        r = best[variant]
        tpots = [f"{t:.1f}" for t in r["tpot_ms"]] + ["-"] * (len(names) - len(r["tpot_ms"]))
        rows.append([variant, str(r["tvm_threads"]), str(r["os_threads"]),
                     f"{r['tok_s']:.1f}", *tpots, f"{r['tok_s'] / base:.2f}"])  # fmt: skip
    print(
        f"{len(names)} models ({args.models}), {args.batch} requests each kept decoding for "
        f"{args.seconds:g} s, {cpu_count()} cores, best of {args.rounds} round(s)"
    )
    header = ["variant", "TVM threads/engine", "OS threads", "aggregate tok/s"]
    header += [f"TPOT ms {k + 1}" for k in range(len(names))] + ["vs split"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
