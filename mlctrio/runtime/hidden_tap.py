"""`HiddenTap`: the target's final hidden states of each sequence's recent positions.

Medusa heads and EAGLE's draft layer draft from the hidden state the target computed at a
position (the normed state its LM head reads). When the model library exports the `*_hidden`
functions (LlamaConfig.hidden_outputs), `TVMRunner` records here, after every step, the hidden
state of each new position of each sequence.

Rules:

* Per sequence, a ring of the last `keep` positions: memory is bounded (keep x hidden floats per
  sequence) and a step costs one copy of its own rows.
* A position is written once per computation: positions at or after a step's first one replace
  what was there (a popped and recomputed position is the new one); positions never computed
  (a prefix-cache hit, a fork's shared prefix before it was copied) are simply missing.
* `rows(seq, lo, hi)` returns the rows of positions [lo, hi) only when every one is held.
"""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]


@attrs.define
class _Ring:
    data: Rows
    lo: int = 0  # first position held
    hi: int = 0  # one past the last position held


@attrs.define
class HiddenTap:
    hidden_size: int
    keep: int = 256
    _rings: dict[int, _Ring] = attrs.field(factory=dict)

    def record(self, seq_id: int, start: int, rows: Rows) -> None:
        """The hidden states of positions [start, start + len(rows)) of seq_id."""
        n = len(rows)
        if n == 0:
            return
        ring = self._rings.get(seq_id)
        if ring is None:
            ring = self._rings[seq_id] = _Ring(np.zeros((self.keep, self.hidden_size), np.float32))
            ring.lo = ring.hi = start
        if start > ring.hi or start < ring.lo:  # a gap, or before what is held: start anew
            ring.lo = ring.hi = start
        if n > self.keep:
            rows, start = rows[-self.keep :], start + n - self.keep
            n = self.keep
        idx = np.arange(start, start + n) % self.keep
        ring.data[idx] = rows
        ring.hi = start + n
        ring.lo = max(min(ring.lo, start), ring.hi - self.keep)

    def rows(self, seq_id: int, lo: int, hi: int) -> Rows | None:
        """Rows of positions [lo, hi), or None when any of them is not held."""
        ring = self._rings.get(seq_id)
        if ring is None or lo < ring.lo or hi > ring.hi or hi <= lo:
            return None
        return ring.data[np.arange(lo, hi) % self.keep]

    def span(self, seq_id: int) -> tuple[int, int]:
        """(first, one past last) position held for seq_id; (0, 0) when none."""
        ring = self._rings.get(seq_id)
        return (ring.lo, ring.hi) if ring is not None else (0, 0)

    def fork(self, parent: int, child: int, length: int) -> None:
        """child shares the parent's first `length` positions."""
        ring = self._rings.get(parent)
        if ring is None or length <= ring.lo:
            return
        copy = _Ring(ring.data.copy(), ring.lo, min(ring.hi, length))
        self._rings[child] = copy

    def drop(self, seq_id: int) -> None:
        self._rings.pop(seq_id, None)
