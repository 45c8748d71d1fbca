"""Step plans: what the scheduler hands the runner for one step (see engine/scheduler.py).

A `StepPlan` is one step's work, frozen once `Scheduler.schedule()` returns it. Invariants:

* The caller executes it in this order: remove `removed_seq_ids`, add `added_seq_ids` (empty
  sequences), run `cache_forks` (parent, child, fork_pos), put `sliding_seq_ids` in the cache's
  sliding-window mode (engine/pages.py), step the batch (`entries`, row i of the
  logits is `entries[i]`), then fork each entry's `fork_seq_ids` from its `seq_id`. Afterwards the
  scheduler's page mirror (`PagePool`) equals the runner's cache.
* An entry's `sample_branches` sample their next token from that entry's row of the logits.
* `aborted` and `length_capped` report requests and branches already ended at this boundary; their
  sequences are among `removed_seq_ids` (or were handed to the prefix cache).

`_Draft` is the mutable plan the scheduler builds during one `schedule()` call.
"""

from __future__ import annotations

import attrs

from .request import Request


@attrs.frozen
class BatchEntry:
    """One row of the step: append token_ids to seq_id; then fork; then sample."""

    request: Request
    seq_id: int
    token_ids: tuple[int, ...]
    fork_seq_ids: tuple[int, ...] = ()  # children forked from seq_id after the step
    sample_branches: tuple[int, ...] = ()  # branch indices sampling from this row's logits
    start: int = 0  # position in the sequence of token_ids[0]
    #: speculative decoding: the last num_draft token_ids are drafted (engine/drafts.py); the
    #: entry then has num_draft + 1 rows of logits, one per position from the pending token on
    num_draft: int = 0


@attrs.frozen
class StepPlan:
    entries: tuple[BatchEntry, ...]
    removed_seq_ids: tuple[int, ...]  # remove from the runner before the step
    added_seq_ids: tuple[int, ...]  # then add these (empty) sequences
    cache_forks: tuple[tuple[int, int, int], ...]  # then fork (parent, child, fork_pos) from cache
    aborted: tuple[Request, ...]  # requests aborted at this boundary
    length_capped: tuple[tuple[Request, int], ...]  # (request, branch) ended "length": no pages
    num_preempted: int = 0
    sliding_seq_ids: tuple[int, ...] = ()  # enter sliding-window mode before the step

    @property
    def num_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries)


@attrs.define
class _Draft:
    """The plan under construction."""

    entries: list[BatchEntry] = attrs.field(factory=list)
    removed: list[int] = attrs.field(factory=list)
    added: list[int] = attrs.field(factory=list)
    aborted: list[Request] = attrs.field(factory=list)
    capped: list[tuple[Request, int]] = attrs.field(factory=list)
    touched: set[int] = attrs.field(factory=set)  # seqs stepped or forked in this plan
    cache_forks: list[tuple[int, int, int]] = attrs.field(factory=list)
    sliding: list[int] = attrs.field(factory=list)
    num_preempted: int = 0
