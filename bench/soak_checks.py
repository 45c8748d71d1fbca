"""The soak's pure logic (bench/soak.py): samples of the server process, growth, SSE completeness,
the tally of responses, and the invariants that decide the exit status.

Rules: no I/O here except `read_proc` (one /proc read, Linux only) and nothing that needs a
server, so every function can be tested on synthetic data (tests/bench/test_soak.py). Values
are stdlib dataclasses (the bench scripts avoid attrs where they can).
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Gauges read from /metrics at every sample (name -> column in the table).
GAUGES = {
    "mlctrio_num_requests_running": "running",
    "mlctrio_num_requests_waiting": "waiting",
    "mlctrio_kv_cache_usage_ratio": "kv_usage",
    "mlctrio_kv_cache_cached_pages": "kv_cached_pages",
}


@dataclass(frozen=True)
class Sample:
    """One look at the server: process facts from /proc, gauges from /metrics, load counters."""

    t_s: float  # since the load started (negative: before it)
    rss_kb: int
    fds: int
    threads: int
    close_wait: int = 0  # of `fds`: sockets the client closed and the server has not
    gauges: dict[str, float] = field(default_factory=dict)  # GAUGES' columns; absent: unreadable
    requests_done: int = 0


@dataclass(frozen=True)
class Growth:
    """Median of the last third of a series minus the median of its first third."""

    first: float
    last: float

    @property
    def delta(self) -> float:
        return self.last - self.first


def read_proc(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, int, int, int]:
    """(VmRSS in kB, open descriptors, threads, descriptors that are TCP sockets in CLOSE-WAIT)
    of process `pid`. CLOSE-WAIT: the peer closed, this process has not (yet) closed its end."""
    rss_kb = threads = 0
    for line in (proc_root / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            rss_kb = int(value.split()[0])
        elif key == "Threads":
            threads = int(value)
    fd_dir = proc_root / str(pid) / "fd"
    targets = []
    for name in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / name))
        except OSError:  # closed meanwhile
            continue
    waiting = close_wait_inodes(
        "\n".join(
            (proc_root / str(pid) / "net" / f).read_text()
            for f in ("tcp", "tcp6")
            if (proc_root / str(pid) / "net" / f).exists()
        )
    )
    close_wait = sum(1 for t in targets if t.startswith("socket:[") and t[8:-1] in waiting)
    return rss_kb, len(targets), threads, close_wait


def close_wait_inodes(net_tcp: str) -> set[str]:
    """Socket inodes in state CLOSE-WAIT (08) in /proc/net/tcp[6] text."""
    inodes = set()
    for line in net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 9 and fields[3] == "08":
            inodes.add(fields[9])
    return inodes


def parse_metrics(text: str, names: Sequence[str] = tuple(GAUGES)) -> dict[str, float]:
    """The sum over label sets of each metric in `names` found in Prometheus text format."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        if name in names:
            found[name] = found.get(name, 0.0) + float(value)
    return found


def growth(values: Sequence[float]) -> Growth | None:
    """First third vs last third (medians); None with fewer than 3 values."""
    if len(values) < 3:
        return None
    third = len(values) // 3
    return Growth(statistics.median(values[:third]), statistics.median(values[-third:]))


def condense(samples: Sequence[Sample], max_rows: int) -> list[Sample]:
    """At most `max_rows` samples, evenly spaced, always keeping the first and the last."""
    if len(samples) <= max_rows:
        return list(samples)
    if max_rows < 2:
        return [samples[-1]][:max_rows]
    step = (len(samples) - 1) / (max_rows - 1)
    return [samples[round(i * step)] for i in range(max_rows)]


@dataclass
class StreamCheck:
    """What one SSE body held: its `data:` events, whether it ended with `data: [DONE]`, which
    choice indexes got a finish_reason, and the first error event's message."""

    events: int = 0
    done: bool = False
    finished: set[int] = field(default_factory=set)
    error: str | None = None
    after_done: int = 0  # events after [DONE]: a framing bug

    def complete(self, n: int = 1) -> bool:
        """[DONE] last, nothing after it, no error event, and all `n` choices finished."""
        return (
            self.done
            and self.after_done == 0
            and self.error is None
            and self.finished >= set(range(n))
        )


def check_sse(body: str) -> StreamCheck:
    """Parse a whole SSE body (comments such as `: ping` are skipped; events are separated by a
    blank line; a `data:` payload is JSON or `[DONE]`)."""
    check = StreamCheck()
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [
            line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")
        ]
        if not data:
            continue
        payload = "\n".join(data)
        if check.done:
            check.after_done += 1
            continue
        check.events += 1
        if payload == "[DONE]":
            check.done = True
            continue
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            check.error = check.error or f"unparsable event: {payload[:80]!r}"
            continue
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            check.error = check.error or str(message)
            continue
        for choice in obj.get("choices") or ():
            if choice.get("finish_reason") is not None:
                check.finished.add(int(choice.get("index", 0)))
    return check


def is_error_envelope(body: bytes | str) -> bool:
    """True for OpenAI's `{"error": {"message": str, "type": str, ...}}`."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    error = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
    )


@dataclass
class Tally:
    """Everything the load saw, by scenario ("kind")."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status) -> count
    truncated: list[str] = field(default_factory=list)  # 200 streams without a complete end
    bad_envelopes: list[str] = field(default_factory=list)  # error statuses without an envelope
    malformed: list[str] = field(default_factory=list)  # a 2xx of the wrong shape or for bad input
    conn_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, exc type)
    conn_error_examples: list[str] = field(default_factory=list)  # the first few, with messages
    notes: Counter[str] = field(default_factory=Counter)  # expected oddities, e.g. "early 404"

    def conn_error(self, kind: str, exc: BaseException | str) -> None:
        name = exc if isinstance(exc, str) else type(exc).__name__
        self.conn_errors[(kind, name)] += 1
        if len(self.conn_error_examples) < 10:
            self.conn_error_examples.append(f"{kind}: {name}: {exc}")

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.conn_errors.values())

    def server_errors(self) -> int:
        """5xx other than 503 (503 is the queue limit's or the drain's answer)."""
        return sum(
            n for (_, s), n in self.statuses.items() if s.isdigit() and s[0] == "5" and s != "503"
        )


@dataclass(frozen=True)
class Limits:
    max_fd_growth: float = 10.0  # idle before vs idle after the load
    max_load_fd_growth: float | None = None  # under load, first vs last third (None: reported)
    max_rss_growth_mb: float | None = None  # None: RSS growth is reported, never fatal
    max_conn_errors: int = 0


@dataclass(frozen=True)
class Ending:
    """The server after the load: idle gauges (None if never idle), idle fds before and after."""

    idle_gauges: dict[str, float] | None
    fds_before: int  # open descriptors minus those in CLOSE-WAIT, idle, before the load
    fds_after: int  # the same once the load is over and the server is idle
    server_alive: bool = True
    close_wait_after: int = 0  # sockets still in CLOSE-WAIT then (reported, not fatal)


def check_invariants(
    tally: Tally, samples: Sequence[Sample], ending: Ending, limits: Limits
) -> list[str]:
    """Each broken invariant as one line; empty when the soak passed. Descriptors are counted
    without the sockets in CLOSE-WAIT, which Hypercorn's trio server keeps until its
    keep-alive timeout: those are reported apart (`Ending.close_wait_after`)."""
    broken = []
    if not ending.server_alive:
        broken.append("the server process died during the soak")
    if tally.truncated:
        broken.append(f"{len(tally.truncated)} streams got 200 but no complete end ([DONE])")
    if tally.server_errors():
        broken.append(f"{tally.server_errors()} responses with a 5xx other than 503")
    if tally.bad_envelopes:
        broken.append(f"{len(tally.bad_envelopes)} error responses without an error envelope")
    if tally.malformed:
        broken.append(
            f"{len(tally.malformed)} responses of the wrong shape (first: {tally.malformed[0]})"
        )
    n_conn = sum(tally.conn_errors.values())
    if n_conn > limits.max_conn_errors:
        broken.append(f"{n_conn} connection errors (limit {limits.max_conn_errors})")
    if ending.idle_gauges is None:
        broken.append("/metrics never answered after the load")
    else:
        busy = {
            k: v for k, v in ending.idle_gauges.items() if k in GAUGES and k != _CACHED and v > 0
        }
        if busy:
            shown = ", ".join(f"{GAUGES[k]}={v:g}" for k, v in sorted(busy.items()))
            broken.append(f"after the load, idle, /metrics still shows {shown}")
    fd_idle = ending.fds_after - ending.fds_before
    if fd_idle > limits.max_fd_growth:
        broken.append(f"idle descriptors grew by {fd_idle} (limit {limits.max_fd_growth:g})")
    fd_growth = growth([s.fds - s.close_wait for s in samples])
    if (
        limits.max_load_fd_growth is not None
        and fd_growth is not None
        and fd_growth.delta > limits.max_load_fd_growth
    ):
        broken.append(
            f"descriptors grew by {fd_growth.delta:g} under load, first third vs last "
            f"(limit {limits.max_load_fd_growth:g})"
        )
    rss_growth = growth([s.rss_kb for s in samples])
    if (
        limits.max_rss_growth_mb is not None
        and rss_growth is not None
        and rss_growth.delta / 1024 > limits.max_rss_growth_mb
    ):
        broken.append(
            f"RSS grew by {rss_growth.delta / 1024:.1f} MB (limit {limits.max_rss_growth_mb:g})"
        )
    return broken


_CACHED = "mlctrio_kv_cache_cached_pages"  # pages only the prefix cache holds: not a leak
