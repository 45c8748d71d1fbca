"""engine/drafts.py: n-gram lookup, the room a draft may take, and the KV it leaves behind."""

from __future__ import annotations

from mlctrio.engine.drafts import NgramProposer, decoding_branch, extend, room_for_draft, trim
from mlctrio.engine.pages import PagePool
from mlctrio.engine.plan import BatchEntry
from mlctrio.engine.request import Request
from mlctrio.engine.types import GenerationRequest, SamplingParams


def test_ngram_proposes_what_followed_the_latest_occurrence() -> None:
    lookup = NgramProposer(min_n=2, max_n=3)
    # "1 2 3" occurs twice before the suffix "1 2 3": the latest one is followed by 7 8
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3]
    assert lookup.propose(tokens, 2) == [7, 8]
    assert lookup.propose(tokens, 10) == [7, 8, 9, 1, 2, 3]  # up to the end
    assert lookup.propose(tokens, 0) == []


def test_ngram_falls_back_to_shorter_ngrams_and_to_nothing() -> None:
    lookup = NgramProposer(min_n=2, max_n=4)
    assert lookup.propose([5, 6, 9, 9, 1, 5, 6], 3) == [9, 9, 1]  # only the 2-gram "5 6" recurs
    assert lookup.propose([1, 2, 3, 4, 5], 3) == []  # nothing recurs
    assert lookup.propose([7], 3) == []


def _decoding_entry(pool: PagePool, max_tokens: int, generated: int) -> BatchEntry:
    req = Request.create(
        GenerationRequest("r", tuple(range(10)), SamplingParams(max_tokens=max_tokens)),
        max_new_tokens=max_tokens,
    )
    branch = req.branches[0]
    branch.output.extend(range(100, 100 + generated))
    branch.seq_id = 0
    pool.add(0)
    pool.append(0, branch.num_tokens)  # the plan appended the pending token already
    branch.num_cached = branch.num_tokens
    return BatchEntry(req, 0, (branch.output[-1],), (), (0,), branch.num_tokens - 1)


def test_room_is_bounded_by_tokens_left_pages_and_window() -> None:
    pool = PagePool(total_pages=100, page_size=4)
    entry = _decoding_entry(pool, max_tokens=8, generated=3)
    assert decoding_branch(entry) is not None
    # 8 - 3 generated - 1 (the token after the draft) = 4 tokens left to draft
    assert room_for_draft(pool, entry, budget=100, context_window_size=1000) == 4
    assert room_for_draft(pool, entry, budget=2, context_window_size=1000) == 2
    assert room_for_draft(pool, entry, budget=100, context_window_size=15) == 2  # 13 + 2 = 15

    tight = PagePool(total_pages=4, page_size=4)  # 13 tokens in 4 pages: 3 more fit
    entry = _decoding_entry(tight, max_tokens=100, generated=3)
    assert room_for_draft(tight, entry, budget=100, context_window_size=1000) == 3


def test_extend_then_trim_leaves_the_tokens_minus_one() -> None:
    pool = PagePool(total_pages=100, page_size=4)
    entry = _decoding_entry(pool, max_tokens=50, generated=2)
    branch = entry.request.branches[0]
    free = pool.num_free  # 12 tokens in 3 pages
    drafted = extend(pool, entry, [7, 8, 9, 10, 11])
    assert drafted.token_ids == (*entry.token_ids, 7, 8, 9, 10, 11)
    assert drafted.num_draft == 5 and pool.length(0) == branch.num_tokens + 5
    assert pool.num_free == free - 2  # 17 tokens in 5 pages
    branch.output.extend([7, 8])  # the target kept one drafted token and added its own
    assert trim(pool, branch) == (0, 4)  # 12 + 5 cached, 14 tokens: keep 13
    assert pool.length(0) == branch.num_tokens - 1 == branch.num_cached
    assert pool.num_free == 100 - 4  # 13 tokens: the pages of the rejected ones are back
    assert trim(pool, branch) is None
