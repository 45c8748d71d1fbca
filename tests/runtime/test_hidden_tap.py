"""HiddenTap keeps each sequence's last `keep` hidden states by position: a recomputed position
replaces the old one, a gap or a fork starts what is known anew, and nothing not held is ever
returned."""

from __future__ import annotations

import numpy as np

from mlctrio.runtime.hidden_tap import HiddenTap


def _rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)


def test_rows_by_position_within_the_ring() -> None:
    tap = HiddenTap(3, keep=8)
    tap.record(1, 0, _rows(0, 5))
    tap.record(1, 5, _rows(5, 1))
    got = tap.rows(1, 2, 6)
    assert got is not None and got[:, 0].tolist() == [2, 3, 4, 5]
    tap.record(1, 6, _rows(6, 6))  # 12 positions seen: only the last 8 are held
    assert tap.span(1) == (4, 12)
    assert tap.rows(1, 3, 5) is None
    got = tap.rows(1, 4, 12)
    assert got is not None and got[:, 0].tolist() == list(range(4, 12))


def test_recomputed_positions_replace_the_old_ones() -> None:
    tap = HiddenTap(3, keep=8)
    tap.record(7, 0, _rows(0, 6))
    tap.record(7, 3, _rows(100, 2))  # popped back to 3, then two new positions
    assert tap.span(7) == (0, 5)
    got = tap.rows(7, 2, 5)
    assert got is not None and got[:, 0].tolist() == [2, 100, 101]
    assert tap.rows(7, 4, 6) is None  # position 5 was dropped with the pop


def test_a_gap_starts_anew_and_a_long_step_keeps_its_tail() -> None:
    tap = HiddenTap(3, keep=4)
    tap.record(2, 0, _rows(0, 2))
    tap.record(2, 10, _rows(10, 2))  # positions 2..9 never computed (a prefix-cache hit)
    assert tap.span(2) == (10, 12) and tap.rows(2, 0, 2) is None
    tap.record(3, 20, _rows(20, 10))
    assert tap.span(3) == (26, 30)
    got = tap.rows(3, 26, 30)
    assert got is not None and got[:, 0].tolist() == [26, 27, 28, 29]


def test_fork_shares_the_prefix_and_drop_forgets() -> None:
    tap = HiddenTap(3, keep=8)
    tap.record(1, 0, _rows(0, 6))
    tap.fork(1, 2, 4)
    assert tap.span(2) == (0, 4)
    tap.record(2, 4, _rows(40, 1))
    got1, got2 = tap.rows(1, 3, 5), tap.rows(2, 3, 5)
    assert got1 is not None and got1[:, 0].tolist() == [3, 4]
    assert got2 is not None and got2[:, 0].tolist() == [3, 40]
    tap.drop(1)
    assert tap.rows(1, 0, 1) is None and tap.span(1) == (0, 0)
