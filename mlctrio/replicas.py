"""`mlctrio serve --replicas N`: N pinned `mlctrio serve` workers behind sglang-router, one unit.

On a CPU one process is bounded by one socket's memory bandwidth; replicas on disjoint cores
(one per NUMA node where the machine has several) scale past it, and the SGLang Model Gateway
(`sglang-router`, cache_aware policy) keeps requests that share a prefix on the replica that has
it cached. See docs/deploy/replicas.md.

Rules:
- Replica i listens on 127.0.0.1:PORT+i (i = 1..N) with the same serve flags, pinned
  (sched_setaffinity, inherited by every thread it starts) to its own core set, with
  TVM_NUM_THREADS = that set's size. Core sets are contiguous runs of the usable CPUs ordered by
  NUMA node (/sys/devices/system/node), so with N a multiple of the node count no replica spans
  two nodes; memory then stays node-local by Linux's first-touch policy.
- The router starts only once every replica's /health is 200: a router that meets a loading
  replica probes it with gRPC over HTTP/2, which Hypercorn can crash on.
- Children run in their own process groups, so each SIGTERM/SIGINT reaches them once, forwarded
  by the supervisor (the replicas drain; a second signal stops them at once, as `mlctrio serve`).
- A child never gets a signal the supervisor was not sent, except when another child exits on
  its own: then every child still running gets one SIGTERM (it drains) and the unit exits 1,
  naming that child in one error line. Children still running --shutdown-timeout + 20 s later
  are killed (an error line each, exit 1).
- After a requested stop the unit exits 0 when every child exited cleanly: status 0, or the
  conventional status of a signal it was sent (-S or 128 + S); otherwise 1, one line per child.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import attrs

from .errors import ConfigError

log = logging.getLogger("mlctrio.replicas")

NODE_DIR = Path("/sys/devices/system/node")
#: Flags of `mlctrio serve` the supervisor sets per child (stripped from the user's argv).
_OWN_FLAGS = ("--replicas", "--router-policy", "--port", "--host")
#: Router flags that turn a draining replica (/health 503) away within about a second, with
#: retries long enough to reach the other replicas meanwhile: no client sees the 503.
ROUTER_FLAGS = (
    "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
    "--worker-startup-check-interval", "1", "--retry-max-retries", "20",
    "--retry-initial-backoff-ms", "100", "--retry-max-backoff-ms", "500",
    "--retry-backoff-multiplier", "2",
)  # fmt: skip
#: How long past --shutdown-timeout a stopping child may take (Hypercorn's graceful 5 s, the
#: engine's 5 s abort wait, the router's own shutdown) before it is killed.
STOP_MARGIN_S = 20.0


def parse_cpulist(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def core_sets(n: int, usable: set[int], node_dir: Path = NODE_DIR) -> list[list[int]]:
    """N disjoint, equal-sized (the first ones one larger) core sets, NUMA node by node."""
    ordered: list[int] = []
    for node in sorted(node_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        ordered += [c for c in parse_cpulist((node / "cpulist").read_text()) if c in usable]
    ordered += sorted(usable - set(ordered))  # no NUMA information: plain CPU order
    if len(ordered) < n:
        raise ConfigError(f"--replicas {n} needs at least {n} usable CPUs, this has {len(ordered)}")
    size, extra = divmod(len(ordered), n)
    sets, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        sets.append(ordered[start:end])
        start = end
    return sets


def child_argv(argv: Sequence[str]) -> list[str]:
    """The user's `serve ...` argv without the flags the supervisor sets itself."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OWN_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in _OWN_FLAGS)):
            out.append(arg)
    return out


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@attrs.define
class Child:
    """One process of the unit, and the signals the supervisor has sent it."""

    name: str
    popen: subprocess.Popen[bytes]
    sent: list[int] = attrs.field(factory=list)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.sent.append(signum)
            self.popen.send_signal(signum)

    def clean_exit(self) -> bool:
        """Exited after a signal we sent it, with 0 or that signal's conventional status (-S or
        128 + S; after a second signal also 130, `mlctrio serve`'s stop-at-once status)."""
        code = self.popen.returncode
        clean = {0, *(-s for s in self.sent), *(128 + s for s in self.sent)}
        stop_at_once = len(self.sent) > 1 and code == 128 + signal.SIGINT
        return bool(self.sent) and (code in clean or stop_at_once)


def _start(name: str, cmd: list[str], cores: list[int] | None = None) -> Child:
    """A child in its own process group: a terminal's Ctrl-C reaches it only through us, once."""
    env = dict(os.environ)
    if cores is None:
        return Child(name, subprocess.Popen(cmd, env=env, process_group=0))
    env["TVM_NUM_THREADS"] = str(len(cores))
    pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
    return Child(name, subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=pin))


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


def run_replicas(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the unit until a signal or a child's exit; the exit status as described above."""
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {args.replicas}")
    if importlib.util.find_spec("sglang_router") is None:
        raise ConfigError("--replicas needs sglang-router: pip install sglang-router==0.3.2")
    if args.api_key or args.api_key_file:
        raise ConfigError("--replicas does not support --api-key: put the key on the router")
    sets = core_sets(args.replicas, os.sched_getaffinity(0))
    urls = [f"http://127.0.0.1:{args.port + i + 1}" for i in range(args.replicas)]
    serve = [sys.executable, "-m", "mlctrio", *child_argv(argv), "--host", "127.0.0.1"]
    children: list[Child] = []
    requested: list[int] = []  # the signals we were sent, in order

    def forward(signum: int, _frame: FrameType | None) -> None:
        requested.append(signum)
        for child in children:
            child.signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, cores in enumerate(sets):
            children.append(
                _start(
                    f"replica {i + 1} ({urls[i]})",
                    [*serve, "--port", str(args.port + i + 1)],
                    cores,
                )
            )
            log.info("replica %d: %s on cores %s", i + 1, urls[i], cores)
        while not requested and not all(_healthy(url) for url in urls):
            if any(child.popen.poll() is not None for child in children):
                break
            time.sleep(0.5)  # a replica loads (or compiles) for seconds to minutes
        if not requested and all(child.popen.poll() is None for child in children):
            children.append(_start("router", [*_router_cmd(args), "--worker-urls", *urls]))
            log.info("router (%s) on http://%s:%d", args.router_policy, args.host, args.port)
            if requested and not children[-1].sent:  # a signal came as the router started
                children[-1].signal(requested[0])
        return _supervise(children, requested, args.shutdown_timeout + STOP_MARGIN_S)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _router_cmd(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", args.host]
    cmd += ["--port", str(args.port), "--policy", args.router_policy, *ROUTER_FLAGS]
    cmd += ["--prometheus-host", "127.0.0.1"]
    return [*cmd, "--prometheus-port", str(args.port + args.replicas + 1)]


def _supervise(children: list[Child], requested: list[int], grace_s: float) -> int:
    """Wait for the first child to exit; stop the rest (once); 0 only after a requested stop that
    every child obeyed cleanly, else one error line per culprit and 1."""
    while all(child.popen.poll() is None for child in children):
        time.sleep(0.1)
    stop_requested = ok = bool(requested)
    if not stop_requested:
        first = next(child for child in children if child.popen.returncode is not None)
        log.error(
            "%s exited on its own (%s): stopping the unit",
            first.name,
            _describe(first.popen.returncode),
        )
        for child in children:
            child.signal(signal.SIGTERM)  # each drains; a child already signalled is not hurried
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("%s did not stop within %.0f s: killed", child.name, grace_s)
            child.popen.kill()
            child.popen.wait()
            ok = False
            continue
        if stop_requested and not child.clean_exit():
            sent = ", ".join(signal.Signals(s).name for s in child.sent) or "no signal"
            log.error(
                "%s exited with %s after %s", child.name, _describe(child.popen.returncode), sent
            )
            ok = False
    return 0 if ok else 1


__all__ = ["ROUTER_FLAGS", "Child", "child_argv", "core_sets", "parse_cpulist", "run_replicas"]
