"""bench/soak.py's own logic: growth, SSE completeness, /proc and /metrics parsing, the tally a
scenario keeps, the invariants (all on synthetic data), and one very short run on mock://echo."""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench import soak
from bench.soak_checks import (
    Ending,
    Growth,
    Limits,
    Sample,
    Tally,
    check_invariants,
    check_sse,
    close_wait_inodes,
    condense,
    growth,
    is_error_envelope,
    parse_metrics,
    read_proc,
)
from bench.soak_load import LoadContext, bad_request, stream


def _event(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _chunk(index: int = 0, finish: str | None = None) -> str:
    return _event(
        {"choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": finish}]}
    )


DONE = "data: [DONE]\n\n"
IDLE = {
    "mlctrio_num_requests_running": 0.0,
    "mlctrio_num_requests_waiting": 0.0,
    "mlctrio_kv_cache_usage_ratio": 0.0,
    "mlctrio_kv_cache_cached_pages": 3.0,  # the prefix cache's: reclaimable, not a leak
}


# -- growth and condensing ------------------------------------------------------------------------


def test_growth_compares_the_medians_of_the_first_and_last_thirds() -> None:
    g = growth([1, 2, 30, 10, 11, 12, 20, 21, 22])
    assert g == Growth(first=2, last=21)
    assert g.delta == 19
    assert growth([5, 100, 7]) == Growth(5, 7)  # one value per third; the middle is ignored
    assert growth([1, 2]) is None


def test_condense_keeps_the_ends_and_spaces_the_rest_evenly() -> None:
    samples = [Sample(float(i), 0, 0, 0) for i in range(101)]
    rows = condense(samples, 11)
    assert [s.t_s for s in rows] == [float(i) for i in range(0, 101, 10)]
    assert condense(samples[:5], 11) == samples[:5]


# -- SSE completeness -----------------------------------------------------------------------------


def test_a_complete_stream_with_pings_and_usage() -> None:
    body = _chunk() + ": ping\n\n" + _chunk(finish="stop") + _event({"choices": []}) + DONE
    check = check_sse(body)
    assert check.complete()
    assert check.events == 4
    assert check.finished == {0}


@pytest.mark.parametrize(
    ("body", "n", "why"),
    [
        (_chunk() + _chunk(finish="stop"), 1, "no [DONE]"),
        (_chunk() + DONE, 1, "no finish_reason"),
        (_chunk(0, "stop") + DONE, 2, "choice 1 never finished"),
        (_chunk(finish="stop") + _event({"error": {"message": "boom"}}) + DONE, 1, "error"),
        (_chunk(finish="stop") + DONE + _chunk(), 1, "an event after [DONE]"),
        ("data: {not json\n\n" + DONE, 1, "unparsable"),
        ("", 1, "empty"),
    ],
)
def test_incomplete_streams(body: str, n: int, why: str) -> None:
    assert not check_sse(body).complete(n), why


def test_sse_details() -> None:
    crlf = (_chunk(0, "stop") + _chunk(1, "length") + DONE).replace("\n", "\r\n")
    assert check_sse(crlf).complete(2)
    errored = check_sse(_event({"error": {"message": "boom"}}) + DONE)
    assert errored.error == "boom"
    assert check_sse(_chunk(finish="stop") + DONE + DONE).after_done == 1


def test_error_envelope() -> None:
    assert is_error_envelope(b'{"error": {"message": "m", "type": "t", "param": null}}')
    assert not is_error_envelope(b'{"error": "m"}')
    assert not is_error_envelope(b'{"detail": "Not Found"}')
    assert not is_error_envelope(b"<html>500</html>")
    assert not is_error_envelope(b"[1]")


# -- /metrics and /proc ---------------------------------------------------------------------------


def test_parse_metrics_sums_label_sets_and_ignores_the_rest() -> None:
    text = (
        "# HELP mlctrio_num_requests_running Requests in the running batch.\n"
        "# TYPE mlctrio_num_requests_running gauge\n"
        'mlctrio_num_requests_running{model_name="a"} 2.0\n'
        'mlctrio_num_requests_running{model_name="b"} 1.0\n'
        'mlctrio_kv_cache_usage_ratio{model_name="a"} 0.25\n'
        'mlctrio_generation_tokens_total{model_name="a"} 99.0\n'
    )
    assert parse_metrics(text) == {
        "mlctrio_num_requests_running": 3.0,
        "mlctrio_kv_cache_usage_ratio": 0.25,
    }


NET_TCP = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode\n"
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000 0 111 1\n"
    "   1: 0100007F:1F90 0100007F:C350 08 00000000:00000000 00:00000000 00000000  1000 0 222 1\n"
    "   2: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000  1000 0 333 1\n"
)


def test_close_wait_inodes() -> None:
    assert close_wait_inodes(NET_TCP) == {"222"}


def test_read_proc_on_a_fake_proc_tree(tmp_path: Path) -> None:
    pid = tmp_path / "42"
    (pid / "fd").mkdir(parents=True)
    (pid / "net").mkdir()
    (pid / "status").write_text("Name:\tmlctrio\nVmRSS:\t  123456 kB\nThreads:\t7\n")
    (pid / "net" / "tcp").write_text(NET_TCP)
    for fd, target in enumerate(["/dev/null", "socket:[111]", "socket:[222]", "pipe:[9]"]):
        os.symlink(target, pid / "fd" / str(fd))
    assert read_proc(42, proc_root=tmp_path) == (123456, 4, 7, 1)


def test_read_proc_sees_a_real_close_wait_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with conn:
            _, fds_before, threads, close_wait_before = read_proc(os.getpid())
            client.close()  # the peer closes; `conn` is now in CLOSE-WAIT until we close it
            assert conn.recv(1) == b""
            rss_kb, fds, threads, close_wait = read_proc(os.getpid())
    assert rss_kb > 0 and threads >= 1
    assert fds == fds_before - 1
    assert close_wait == close_wait_before + 1


# -- what a scenario records ----------------------------------------------------------------------


def _context(handler: Callable[[httpx.Request], httpx.Response]) -> LoadContext:
    client = httpx.AsyncClient(base_url="http://soak.test", transport=httpx.MockTransport(handler))
    return LoadContext(client, "mock://echo", "soak.test", 80, api_key="sk-1")


async def test_stream_tallies_a_200_without_done_as_truncated() -> None:
    bodies = iter([_chunk(finish="stop") + DONE, _chunk(finish="stop")])

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sk-1"
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=next(bodies))

    ctx = _context(handler)
    async with ctx.client:
        await stream(ctx, "chat_stream", "/v1/chat/completions", {"model": "m"})
        await stream(ctx, "chat_stream", "/v1/chat/completions", {"model": "m"})
    assert ctx.tally.statuses[("chat_stream", "200")] == 2
    assert len(ctx.tally.truncated) == 1
    assert "done=False" in ctx.tally.truncated[0]
    assert ctx.done == 2


async def test_bad_requests_need_an_error_envelope_and_must_not_succeed() -> None:
    answers = iter(
        [
            httpx.Response(400, json={"error": {"message": "bad", "type": "invalid_request"}}),
            httpx.Response(500, text="Internal Server Error"),
            httpx.Response(200, json={"choices": [{}]}),
        ]
    )
    ctx = _context(lambda request: next(answers))
    async with ctx.client:
        for _ in range(3):
            await bad_request(ctx, random.Random(0))
    assert sum(ctx.tally.statuses.values()) == 3
    assert len(ctx.tally.bad_envelopes) == 1 and "500" in ctx.tally.bad_envelopes[0]
    assert len(ctx.tally.malformed) == 1 and "answered 200" in ctx.tally.malformed[0]
    assert ctx.tally.server_errors() == 1


# -- invariants -----------------------------------------------------------------------------------


def _samples(fds: list[int], close_wait: list[int] | None = None) -> list[Sample]:
    waits = close_wait or [0] * len(fds)
    return [
        Sample(float(i), 100_000, f, 8, w) for i, (f, w) in enumerate(zip(fds, waits, strict=True))
    ]


def test_a_clean_soak_breaks_nothing() -> None:  # default limits: under-load growth is reported
    tally = Tally()
    tally.statuses[("burst", "503")] = 5  # the queue limit's answer: expected
    tally.statuses[("chat", "200")] = 50
    # Many sockets in CLOSE-WAIT, growing: reported, but not descriptors the server leaked.
    samples = _samples([20, 21, 20, 40, 41, 40, 60, 61, 60], [0, 1, 0, 20, 21, 20, 40, 41, 40])
    assert check_invariants(tally, samples, Ending(IDLE, 10, 11), Limits()) == []


def test_each_broken_invariant_is_one_line() -> None:
    tally = Tally()
    tally.statuses[("chat", "500")] = 2
    tally.truncated.append("chat_stream: no [DONE]")
    tally.bad_envelopes.append("chat 500: b''")
    tally.malformed.append("bad:json answered 200")
    tally.conn_errors[("chat", "ReadError")] = 1
    busy = IDLE | {"mlctrio_kv_cache_usage_ratio": 0.01, "mlctrio_num_requests_waiting": 1.0}
    samples = _samples([20, 20, 20, 40, 40, 40, 60, 60, 60])
    broken = check_invariants(
        tally,
        samples,
        Ending(busy, 10, 30, server_alive=False),
        Limits(max_load_fd_growth=30.0, max_rss_growth_mb=0.0),
    )
    text = "\n".join(broken)
    for needle in (
        "died",
        "1 streams got 200",
        "2 responses with a 5xx",
        "without an error envelope",
        "wrong shape",
        "1 connection errors",
        "kv_usage=0.01, waiting=1",
        "idle descriptors grew by 20",
        "descriptors grew by 40 under load",
    ):
        assert needle in text, needle
    assert len(broken) == 9  # RSS did not grow: its limit of 0 MB holds
    grown = _samples([20] * 9)
    grown[-3:] = [Sample(9.0, 200_000, 20, 8)] * 3
    assert any("RSS grew by 97.7 MB" in line for line in check_invariants(
        Tally(), grown, Ending(IDLE, 10, 10), Limits(max_rss_growth_mb=50.0)
    ))  # fmt: skip


def test_metrics_that_never_answered_break_the_soak() -> None:
    assert check_invariants(Tally(), [], Ending(None, 5, 5), Limits()) == [
        "/metrics never answered after the load"
    ]


# -- a very short real run ------------------------------------------------------------------------


def test_a_short_soak_on_mock_echo_passes(capsys: pytest.CaptureFixture[str]) -> None:
    # Every invariant with its default limit, connection errors included (the server's
    # keep-alive outlives clients' pools, so a reused connection is never closed under a request).
    argv = ["--minutes", "0.1", "--clients", "4", "--sample-s", "1", "--idle-timeout", "30"]
    assert soak.main(argv) == 0
    out = capsys.readouterr().out
    assert "streams with a 200 but no complete end: 0" in out
    assert "connection errors:" in out
    assert "PASS" in out
    assert "chat_stream" in out and "burst" in out  # the status table lists every scenario
