"""The report of bench/compare.py: the comparison table, best-of-rounds, ratios, the plot.

Rules: a "run" is one server's results over the concurrency levels ({"name", "results": [LoadResult
per level], ...}); the ratio is mlctrio / llama.cpp from the *same* run set (the first server whose
name starts with "mlctrio" over the first starting with "llama.cpp"): tok/s > 1 and latency < 1
favour mlctrio. Across rounds, each server and level keeps its best-throughput round.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

_COLUMNS = (
    ("out tok/s", lambda r: r.output_throughput, 1.0),
    ("TTFT p50", lambda r: r.summary("ttft").p50, 1e3),
    ("TTFT p99", lambda r: r.summary("ttft").p99, 1e3),
    ("TPOT p50", lambda r: r.summary("tpot").p50, 1e3),
    ("TPOT p99", lambda r: r.summary("tpot").p99, 1e3),
)


def _fmt(x: float, scale: float) -> str:
    return "-" if math.isnan(x) else f"{x * scale:.1f}"


def comparison_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per (metric, concurrency): the metric for every server, then the ratio
    mlctrio / llama.cpp, plus failed requests (a level with failures is less comparable)."""
    names = [run["name"] for run in runs]
    base = next((i for i, n in enumerate(names) if n.startswith("llama.cpp")), None)
    ours = next((i for i, n in enumerate(names) if n.startswith("mlctrio")), None)
    with_ratio = base is not None and ours is not None
    header = ["metric", "conc", *names, *(["mlctrio/llama.cpp"] if with_ratio else []), "failed"]
    rows = []
    levels = [r.config.concurrency for r in runs[0]["results"]]
    for col, get, scale in _COLUMNS:
        unit = "" if col.startswith("out") else " (ms)"
        for li, conc in enumerate(levels):
            results = [run["results"][li] for run in runs]
            values = [get(r) for r in results]
            row = [col + unit, str(conc), *(_fmt(v, scale) for v in values)]
            if with_ratio:
                b, o = values[base], values[ours]  # type: ignore[index]
                row.append("-" if not (b and o) or math.isnan(b + o) else f"{o / b:.2f}")
            row.append("/".join(str(r.num_failed) for r in results))
            rows.append(row)
    return header, rows


def best_runs(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per server and concurrency level, the round with the highest output throughput: on a
    shared machine the least disturbed run is the closest to what the server can do (the same
    rule as bench/runtime.py's best-of-N). Every round stays in the JSON."""
    best = []
    for i, first in enumerate(rounds[0]):
        results = [
            max((rnd[i]["results"][li] for rnd in rounds), key=lambda r: r.output_throughput)
            for li in range(len(first["results"]))
        ]
        best.append({**first, "results": results})
    return best


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mlctrio / llama.cpp per concurrency and metric, for the JSON."""
    names = [run["name"] for run in runs]
    try:
        base = next(r for r, n in zip(runs, names, strict=True) if n.startswith("llama.cpp"))
        ours = next(r for r, n in zip(runs, names, strict=True) if n.startswith("mlctrio"))
    except StopIteration:
        return []
    out = []
    for rb, ro in zip(base["results"], ours["results"], strict=True):
        entry: dict[str, Any] = {"concurrency": rb.config.concurrency}
        for col, get, _ in _COLUMNS:
            b, o = get(rb), get(ro)
            entry[col] = None if not b or math.isnan(b + o) else o / b
        out.append(entry)
    return out


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Throughput and latency percentiles against concurrency, one line per server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    panels = [*_COLUMNS, ("E2E p50", lambda r: r.summary("e2e").p50, 1e3)]
    for ax, (col, get, scale) in zip(axes.flat, panels, strict=True):
        for run in runs:
            conc = [r.config.concurrency for r in run["results"]]
            ax.plot(conc, [get(r) * scale for r in run["results"]], "o-", label=run["name"])
        ax.set_title(col + ("" if col.startswith("out") else " (ms, log scale)"))
        if not col.startswith("out"):
            ax.set_yscale("log")  # the servers can be orders of magnitude apart
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def round_ratio_lines(rounds: list[list[dict[str, Any]]], metric: str = "out tok/s") -> list[str]:
    """Per concurrency level, `metric`'s ratio mlctrio / llama.cpp in every round (each round's
    two servers ran minutes apart, so a round's ratio is a same-run ratio): its spread is the
    noise of the comparison."""
    per_level: dict[int, list[float | None]] = {}
    for rnd in rounds:
        for entry in ratios(rnd):
            per_level.setdefault(entry["concurrency"], []).append(entry[metric])
    return [
        f"conc {conc:>3}: {metric} ratio per round "
        + ", ".join("-" if v is None else f"{v:.2f}" for v in values)
        for conc, values in per_level.items()
    ]
