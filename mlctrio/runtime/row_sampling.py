"""From logits rows to sampled tokens for a set of (request, choice) rows: grammar masks, bans,
then the sampler. Used by `EngineCore` (runtime/core.py) for a step's rows, and once per drafted
position when it verifies speculative drafts.

Rules:

* Grammar masks go on the constrained rows only (unconstrained rows pay nothing). When masking
  the batch fails, each row is masked alone and the requests whose mask fails are failed through
  the `guard` the caller passes (their rows drop out); the others are sampled.
* Then each row's banned ids (ignore_eos, min_tokens: `RequestState.banned_for`) get -inf, and
  the sampler draws from the row's own generator (one uniform per non-greedy row), so a choice's
  tokens depend only on its own logits and history, whatever else shares the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..engine.scheduler import BatchEntry
from .grammar import apply_bitmasks
from .output_processor import RequestState
from .sampler import SampleOutput, Sampler, ban_tokens

log = logging.getLogger(__name__)

Row = tuple[BatchEntry, int, RequestState]  # (entry, choice index, the request's state)
#: guard(state, work, *args): runs one request's work; False when that failed the request
Guard = Callable[..., bool]


def sample_rows(
    sampler: Sampler, rows: Sequence[Row], logits: Any, guard: Guard
) -> tuple[list[int], SampleOutput | None]:
    """Sample row k of `logits` for rows[k]; returns the indices of the rows kept (their
    requests did not fail) and the sampler's output, whose row j is kept[j]'s."""
    keep = list(range(len(rows)))
    matchers = [state.choices[i].matcher for _, i, state in rows]
    if any(m is not None for m in matchers) and not _apply_masks(logits, matchers, rows, guard):
        failed = {k for k, (_, _, s) in enumerate(rows) if s.req.is_terminal}
        keep = [k for k in keep if k not in failed]
        logits = logits[keep]
    if not keep:
        return [], None
    kept = [rows[k] for k in keep]
    banned = [state.banned_for(i) for _, i, state in kept]
    if any(b is not None for b in banned):
        ban_tokens(logits, banned)
    out = sampler.sample(
        logits,
        [e.request.spec.params for e, _, _ in kept],
        [state.choices[i].generator for _, i, state in kept],
        [e.request.branches[i].output for e, i, _ in kept],
        [e.request.spec.prompt_token_ids for e, _, _ in kept],
    )
    return keep, out


def _apply_masks(logits: Any, matchers: list[Any], rows: Sequence[Row], guard: Guard) -> bool:
    """True when the batch's masks went on; otherwise each row is masked alone under `guard`."""
    try:
        apply_bitmasks(logits, matchers)
        return True
    except Exception:
        log.exception("grammar masks failed for the batch; masking row by row")
    for k, matcher in enumerate(matchers):
        if matcher is not None:
            guard(rows[k][2], apply_bitmasks, logits[k : k + 1], [matcher])
    return False


def one_row(logits: Any, k: int) -> Any:
    """Row k of a logits block as a (1, vocab) array the sampler may modify."""
    return np.array(logits[k : k + 1])
