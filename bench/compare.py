"""mlctrio against llama.cpp's server on the same weights, same load, same threads.

    python bench/compare.py --model small --quant f32
    python bench/compare.py --model small --quant q4 --concurrency 1,4,8,16 --output-tokens 64
    python bench/compare.py --gguf FILE.gguf                        # any GGUF, both servers
    python bench/compare.py --gguf FILE.gguf --gguf-type Q8_0 --activations q8

For each server in turn (only one is ever running, so they never compete for the cores):

* mlctrio: `python -m mlctrio serve DIR --mode server --quantization Q`, TVM_NUM_THREADS=2;
* llama.cpp: `llama-server -m DIR.gguf -t 2 -tb 2 -np 8 -c <ctx * 8>` (continuous batching over 8
  slots; requests beyond 8 wait in its queue), the GGUF written by bench/to_gguf.py from the same
  checkpoint (built once by bench/llama_cpp.py);
* llama-cpp-python's server, when `llama_cpp` is importable (optional; it serves one request at
  a time and has no `ignore_eos`, so its requests may stop early — its row says how many tokens it
  produced).

bench/serve.py drives each with the same closed loop: streaming /v1/completions, prompts of exactly
`--prompt-tokens` token ids (both servers share the tokenizer, so the ids mean the same text), and
`--output-tokens` tokens each (`max_tokens` + `ignore_eos`, which both mlctrio and llama-server
honour). One table compares them: output tok/s, TTFT and TPOT p50/p99, with the ratio
mlctrio / llama.cpp (tok/s: > 1 means mlctrio is faster; latencies: < 1 means mlctrio is faster).
Results go to JSON (every round, the table's best round per level, the ratios, load averages, the
llama-server version) and a PNG. `--repeat N` runs N rounds that alternate the servers and keeps,
per server and level, the round with the best output throughput (the least disturbed one).

`--gguf FILE` serves one GGUF file on both sides instead (no conversion, `--model`/`--quant`
ignored): `mlctrio serve FILE --mode server` (with `--activations` when given: q8 is llama.cpp-style
int8 activations) and `llama-server -m FILE` with the same `--threads`, as many slots as the highest
concurrency level (unless `--parallel` says otherwise) and each slot's context sized for one
request. `--gguf-type T` first makes FILE's T version with llama-quantize (bench/llama_cpp.py,
cached), e.g. Q8_0 or F32 from a Q4_1 file.

Quantization presets (`--quant`, demo models):

    f32: mlctrio q0f32     vs GGUF f32   (the same numbers on both sides)
    q8:  mlctrio q0f32     vs GGUF q8_0  (mlctrio has no 8-bit format: not like for like)
    q4:  mlctrio q4f32_1   vs GGUF q4_0  (both 4-bit with one scale per 32 weights; MLC's scale is
                                          f32 and decodes (q-7)*s, q4_0's is f16 and decodes
                                          (q-8)*d: same storage class, not bit-identical weights)

Timings from a shared 2-core machine are noisy: the load average before and after each server's
run is printed and saved, and only ratios from the same run should be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llama_cpp, llama_server
from bench._common import mlctrio_serve_cmd
from bench.compare_report import best_runs, comparison_rows, plot, ratios, round_ratio_lines
from bench.serve import LoadConfig, LoadResult, format_table, run_sweep
from bench.to_gguf import cached_gguf

# --quant preset -> (mlctrio quantization, GGUF outtype)
QUANT_PRESETS = {"f32": ("q0f32", "f32"), "q8": ("q0f32", "q8_0"), "q4": ("q4f32_1", "q4_0")}
SERVERS = ("mlctrio", "llama.cpp", "llama-cpp-python")


@dataclass(frozen=True)
class Target:
    """One server to benchmark: how to start it and how to name it in the table."""

    name: str
    cmd: list[str]  # "{port}" stands for the port, picked when the server starts
    env: dict[str, str]
    health_path: str = "/health"


def _model_ref(model: str) -> str:
    """`small` / `tiny` are the demo presets; anything else is a path or HF://org/name."""
    return f"demo://{model}" if model in ("tiny", "small") else model


def gguf_label(gguf: Path) -> str:
    """The type in a GGUF file name ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "Q4_1"), else "gguf"."""
    stem = gguf.name.removesuffix(".gguf")
    suffix = stem.rsplit(".", 1)[-1] if "." in stem else ""
    return suffix if suffix and suffix[0] in "QFBI" and len(suffix) <= 8 else "gguf"


def resolve_gguf(args: argparse.Namespace) -> Path | None:
    """--gguf, requantized by llama-quantize when --gguf-type asks for it; None without --gguf."""
    if args.gguf is None:
        return None
    if args.gguf_type:
        return llama_cpp.cached_quantized_gguf(args.gguf, args.gguf_type)
    return Path(args.gguf)


def llama_parallel(args: argparse.Namespace) -> int:
    """llama-server's slots: --parallel, else the highest concurrency (--gguf) or 8 (demo)."""
    if args.parallel is not None:
        return int(args.parallel)
    return max(args.concurrency) if args.gguf is not None else 8


def build_targets(args: argparse.Namespace) -> list[Target]:
    """The servers to run, in order, with their command lines."""
    threads = str(args.threads)
    # Pin every thread pool we know of, so "2 threads" means the same on each side.
    thread_env = {"TVM_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    ctx_per_slot = max(512, args.prompt_tokens + args.output_tokens + 64)
    targets: list[Target] = []
    wanted = set(args.servers)
    gguf = resolve_gguf(args)
    if gguf is not None:
        gguf_type = gguf_label(gguf)
        print(f"GGUF: {gguf}", flush=True)
    else:
        mlc_quant, gguf_type = QUANT_PRESETS[args.quant]
        mlc_quant = args.mlc_quant or mlc_quant
    if "mlctrio" in wanted and gguf is not None:
        extra = ["--activations", args.activations] if args.activations else []
        if args.mlctrio_overrides:
            extra += ["--overrides", args.mlctrio_overrides]
        name = f"mlctrio[{gguf_type}{'/' + args.activations if args.activations else ''}]"
        targets.append(Target(name, mlctrio_serve_cmd(gguf, "{port}", extra), thread_env))
    elif "mlctrio" in wanted:
        from mlctrio.runtime.model_loader import resolve_model_dir

        model_dir = resolve_model_dir(_model_ref(args.model))
        extra = ["--quantization", mlc_quant]
        if args.mlctrio_overrides:
            extra += ["--overrides", args.mlctrio_overrides]
        cmd = mlctrio_serve_cmd(model_dir, "{port}", extra)
        targets.append(Target(f"mlctrio[{mlc_quant}]", cmd, thread_env))
    if gguf is None and ("llama.cpp" in wanted or "llama-cpp-python" in wanted):
        gguf = cached_gguf(_model_ref(args.model), gguf_type)
        print(f"GGUF: {gguf}", flush=True)
    if "llama.cpp" in wanted:
        binary = llama_cpp.ensure_llama_server()
        cmd = llama_server.llama_server_cmd(
            binary,
            gguf,
            "{port}",
            threads=args.threads,
            parallel=llama_parallel(args),
            ctx_per_slot=ctx_per_slot,
        )
        targets.append(Target(f"llama.cpp[{gguf_type}]", cmd, thread_env))
    if "llama-cpp-python" in wanted:
        if not _has_llama_cpp_python_server():
            print(
                "llama-cpp-python's server is not installed "
                "(pip install 'llama-cpp-python[server]'): skipping it",
                file=sys.stderr,
            )
        else:
            cmd = [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--n_threads",
                threads,
                "--n_threads_batch",
                threads,
                "--n_ctx",
                str(ctx_per_slot),
            ]
            targets.append(Target(f"llama-cpp-python[{gguf_type}]", cmd, thread_env, "/v1/models"))
    return targets


def _has_llama_cpp_python_server() -> bool:
    """Whether `python -m llama_cpp.server` can start. Asked in a subprocess run from a neutral
    directory: in this process `llama_cpp` would find bench/llama_cpp.py (this script's
    directory is on sys.path), and the server needs extras beyond the `llama_cpp` package."""
    probe = subprocess.run(
        # llama_cpp.server imports without its extras; its __main__ needs uvicorn and the app.
        [sys.executable, "-c", "import uvicorn, llama_cpp.server.app"],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_target(target: Target, configs: Sequence[LoadConfig], log_dir: Path) -> dict[str, Any]:
    """Start one server, run one closed loop per config (concurrency level), stop the server
    (by PID, also on error or Ctrl-C)."""
    port = llama_server.free_port()
    cmd = [arg.replace("{port}", str(port)) for arg in target.cmd]
    print(f"\n== {target.name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    server = llama_server.start_server(
        target.name.split("[")[0],
        cmd,
        port,
        env=target.env,
        startup_timeout_s=1800,
        log_dir=log_dir,
        health_path=target.health_path,
    )
    results: list[LoadResult] = []
    try:
        print(
            f"   up in {time.monotonic() - start:.1f} s (pid {server.proc.pid}, "
            f"log {server.log_path})",
            flush=True,
        )
        load_before = os.getloadavg()
        for config in configs:
            (result,) = run_sweep(replace(config, base_url=server.url), [config.concurrency])
            results.append(result)
            print(
                f"   conc {config.concurrency:>3}: {result.output_throughput:7.1f} out tok/s, "
                f"TTFT p50 {result.summary('ttft').p50 * 1e3:8.1f} ms, "
                f"TPOT p50 {result.summary('tpot').p50 * 1e3:7.1f} ms, "
                f"{len(result.ok)} ok / {result.num_failed} failed, "
                f"{result.num_output_tokens / max(len(result.ok), 1):.0f} tok/request, "
                f"load avg {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        load_after = os.getloadavg()
    except BaseException:
        print(
            f"   {target.name} failed; server log tail:\n{server.log_tail(2000)}", file=sys.stderr
        )
        raise
    finally:
        server.stop()
    return {
        "name": target.name,
        "cmd": cmd,
        "env": target.env,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": results,
    }


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="small", help="tiny, small (demo presets) or a path")
    p.add_argument("--quant", choices=sorted(QUANT_PRESETS), default="f32")
    p.add_argument("--mlc-quant", help="override mlctrio's quantization (e.g. q0f16)")
    p.add_argument("--gguf", type=Path, help="serve this GGUF file on both sides (see above)")
    p.add_argument("--gguf-type", help="with --gguf: llama-quantize it to this type first (Q8_0)")
    p.add_argument("--activations", help="with --gguf: mlctrio serve --activations (e.g. q8)")
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        type=lambda s: s.split(","),
        help=f"comma-separated subset of {','.join(SERVERS)}",
    )
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 8, 16])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="measured requests per level (default: max(8, 2 * concurrency))",
    )
    p.add_argument("--warmup", type=int, default=2, help="discarded requests before each level")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="llama-server slots (-np); default 8, with --gguf the highest --concurrency",
    )
    p.add_argument("--mlctrio-overrides", help='passed as --overrides, e.g. "max_num_sequence=8"')
    p.add_argument("--max-time", type=float, default=900.0, help="hard stop per level, s")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds over all servers; the table keeps the best"
    )
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/mlctrio-compare"))
    return p


def run_names(args: argparse.Namespace, names: Sequence[str]) -> tuple[str, str]:
    """(file stem, title) of a run: the model or GGUF file, the servers, the load."""
    if args.gguf is not None:
        what = Path(args.gguf).name.removesuffix(".gguf")
        stem = f"compare-{what}-{args.gguf_type or 'as-is'}-{args.activations or 'default'}"
        what += f" -> {args.gguf_type}" if args.gguf_type else ""
    else:
        what, stem = args.model, f"compare-{Path(args.model).name}-{args.quant}"
    title = (
        f"{what}: {' vs '.join(names)}, {args.threads} threads, "
        f"prompt {args.prompt_tokens} tok, output {args.output_tokens} tok"
    )
    return stem, title


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.gguf is None and (args.gguf_type or args.activations):
        p.error("--gguf-type and --activations need --gguf")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown servers {sorted(unknown)}; known: {SERVERS}")
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    targets = build_targets(args)
    if not targets:
        raise SystemExit("nothing to run")
    base = LoadConfig(
        endpoint="completions",
        token_ids=True,  # exactly --prompt-tokens tokens on both sides (same tokenizer)
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        warmup=args.warmup,
        max_time_s=args.max_time,
    )
    # One config per level: its own request count (enough for every worker to run twice) and its
    # own seed, so no level re-sends another level's prompts (both servers cache prefixes).
    configs = [
        replace(base, concurrency=c, num_requests=args.num_requests or max(8, 2 * c), seed=i)
        for i, c in enumerate(args.concurrency)
    ]
    # Rounds alternate the servers (A B A B ...), so a burst of load from elsewhere on a shared
    # machine hits both rather than one; the table keeps each level's best round (see best_runs).
    rounds = [
        [run_target(target, configs, args.out_dir) for target in targets]
        for _ in range(args.repeat)
    ]
    runs = best_runs(rounds)

    stem, title = run_names(args, [t.name for t in targets])
    header, rows = comparison_rows(runs)
    print(
        f"\n{title}\n(latencies in ms; ratio = mlctrio / llama.cpp: tok/s > 1 and latency < 1 "
        "favour mlctrio)"
    )
    print(format_table(header, rows, markdown=False))
    if len(rounds) > 1:
        print("\n".join(round_ratio_lines(rounds)))
    meta = {
        "title": title,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "llama_server_version": _llama_version(targets),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "quant_presets": QUANT_PRESETS,
    }
    out_json = args.out_dir / f"{stem}.json"
    out_json.write_text(
        json.dumps(
            {
                "meta": meta,
                # the best round per level (what the table shows), then every round
                "servers": [_run_json(run) for run in runs],
                "rounds": [[_run_json(run) for run in rnd] for rnd in rounds],
                "ratios_mlctrio_over_llama_cpp": ratios(runs),
                "table": {"header": header, "rows": rows},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out_json}")
    if plot(runs, args.out_dir / f"{stem}.png", title):
        print(f"wrote {args.out_dir / f'{stem}.png'}")
    failed = any(
        r.num_failed or r.truncated for rnd in rounds for run in rnd for r in run["results"]
    )
    return 1 if failed else 0


def _run_json(run: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in run.items() if k != "results"},
        "runs": [r.to_dict() for r in run["results"]],
    }


def _llama_version(targets: list[Target]) -> str | None:
    for t in targets:
        if t.name.startswith("llama.cpp"):
            return llama_cpp.llama_server_version(Path(t.cmd[0]))
    return None


if __name__ == "__main__":
    sys.exit(main())
