"""`mlctrio serve --replicas N`: core sets, argv, and the supervised unit end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from bench._common import free_port_run
from mlctrio.replicas import child_argv, core_sets, parse_cpulist

from .cluster import ECHO, MODEL, get_ok, wait_until


def test_cpulist_and_numa_ordered_disjoint_sets(tmp_path: Path) -> None:
    assert parse_cpulist("0-2,8,10-11\n") == [0, 1, 2, 8, 10, 11]
    for node, cpus in (("node1", "4-7"), ("node0", "0-3")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus)
    sets = core_sets(2, set(range(8)) - {5}, tmp_path)
    assert sets == [[0, 1, 2, 3], [4, 6, 7]]
    assert core_sets(4, set(range(8)), tmp_path) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_child_argv_drops_the_supervisor_flags() -> None:
    argv = ["serve", "M", "--replicas", "2", "--port=9", "--host", "h", "--router-policy", "x"]
    assert child_argv([*argv, "--mode", "server"]) == ["serve", "M", "--mode", "server"]


def _lists_model(url: str) -> bool:
    try:
        return MODEL in httpx.get(f"{url}/v1/models", timeout=2).text
    except httpx.HTTPError:
        return False


def _start_unit(port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mlctrio", "serve", ECHO, "--replicas", "2", "--port", str(port)]
    with log.open("wb") as out:
        unit = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _lists_model(f"http://127.0.0.1:{port}"), "the router", timeout_s=90)
    except AssertionError:
        unit.kill()
        unit.wait()
        raise AssertionError(log.read_text()[-3000:]) from None
    return unit


def _child_pid(parent: int, arg: str) -> int:
    """The pid of `parent`'s child whose command line has `arg` (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and arg.encode() in argv:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {parent} has {arg!r} on its command line")


def test_replicas_unit_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port_run(4)  # the router, 2 replicas, its Prometheus port
    log = tmp_path / "unit.log"
    unit = _start_unit(port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hey"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hey"
        for i in (1, 2):
            assert get_ok(f"http://127.0.0.1:{port + i}/health")
        unit.send_signal(signal.SIGTERM)
        assert unit.wait(60) == 0, log.read_text()[-3000:]
        assert " ERROR " not in log.read_text()
    finally:
        if unit.poll() is None:
            unit.kill()
            unit.wait()


def test_a_replica_that_dies_stops_the_unit_with_status_1(tmp_path: Path) -> None:
    port = free_port_run(4)  # the router, 2 replicas, its Prometheus port
    log = tmp_path / "unit.log"
    unit = _start_unit(port, log)
    try:
        os.kill(_child_pid(unit.pid, str(port + 2)), signal.SIGKILL)
        assert unit.wait(60) == 1, log.read_text()[-3000:]
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        expected = f"replica 2 (http://127.0.0.1:{port + 2}) exited on its own (killed by SIGKILL)"
        assert len(errors) == 1 and expected in errors[0], errors
        assert not get_ok(f"http://127.0.0.1:{port + 1}/health")  # the other one was stopped too
    finally:
        if unit.poll() is None:
            unit.kill()
            unit.wait()
