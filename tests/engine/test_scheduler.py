"""Scheduler decisions, driven directly (no runner): decode-first chunked prefill, the token and
seat budgets, preemption order, forking for n > 1, and add() validation."""

from __future__ import annotations

import pytest

from mlctrio.engine.request import Request, RequestState
from mlctrio.engine.scheduler import PromptTooLongError, Scheduler, StepPlan
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.errors import ContextLengthExceededError


def make(total_pages: int = 64, max_seqs: int = 8, chunk: int = 32, window: int = 512) -> Scheduler:
    return Scheduler(
        total_pages=total_pages,
        page_size=16,
        max_num_sequence=max_seqs,
        prefill_chunk_size=chunk,
        context_window_size=window,
    )


def submit(s: Scheduler, rid: str, prompt_len: int, n: int = 1, max_tokens: int = 100) -> Request:
    spec = GenerationRequest(
        rid, tuple(range(1, prompt_len + 1)), SamplingParams(n=n, max_tokens=max_tokens)
    )
    return s.add(spec)


def run_step(s: Scheduler) -> StepPlan:
    """Plan a step and 'sample' token 5 for every sampling branch (finishing at max_new_tokens)."""
    plan = s.schedule()
    for entry in plan.entries:
        for index in entry.sample_branches:
            s.append_token(entry.request, index, 5)
            if entry.request.branches[index].num_generated >= entry.request.max_new_tokens:
                s.finish_branch(entry.request, index)
    return plan


def tokens_by_request(plan: StepPlan) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in plan.entries:
        out[e.request.request_id] = out.get(e.request.request_id, 0) + len(e.token_ids)
    return out


def test_steps_that_decode_carry_at_most_the_decoding_prefill_budget() -> None:
    s = Scheduler(
        total_pages=64,
        page_size=16,
        max_num_sequence=8,
        prefill_chunk_size=256,
        context_window_size=512,
        prefill_tokens_while_decoding=24,
    )
    long = submit(s, "long", 300)
    assert tokens_by_request(run_step(s)) == {"long": 256}  # nobody decodes: the whole chunk
    run_step(s)  # the rest of its prompt (44 tokens): now it decodes
    assert long.branches[0].num_generated == 1
    second = submit(s, "second", 100)
    steps = []
    while second.branches[0].num_generated == 0:
        steps.append(tokens_by_request(run_step(s)))
    assert [step["long"] for step in steps] == [1] * len(steps)
    assert [step["second"] for step in steps] == [24, 24, 24, 24, 4]


def test_long_prompt_never_stalls_running_decodes() -> None:
    s = make(chunk=32)
    submit(s, "a", 10)
    submit(s, "b", 12)
    run_step(s)  # both prefilled in one step (22 tokens <= 32)
    long = submit(s, "long", 300)
    prefill_steps = 0
    while long.branches[0].num_generated == 0:
        plan = run_step(s)
        got = tokens_by_request(plan)
        assert got["a"] == 1 and got["b"] == 1, "a running stream missed its token"
        assert plan.num_tokens <= 32
        assert got.get("long", 0) == 30  # the rest of the budget, every step
        prefill_steps += 1
    assert prefill_steps == 10  # 300 tokens in chunks of 30


def test_preempts_most_recently_started_and_keeps_tokens() -> None:
    s = make(total_pages=6, chunk=128)
    old = submit(s, "old", 32)  # exactly 2 pages; the first decode needs a third
    new = submit(s, "new", 48)  # 3 pages
    run_step(s)
    assert s.pool.num_free == 1
    plan = run_step(s)  # old takes the last page; new then needs one and preempts itself
    assert plan.num_preempted == 1 and new.state is RequestState.PREEMPTED
    assert s.waiting[0] is new and new.branches[0].num_generated == 1
    assert new.branches[0].num_cached == 0 and new.branches[0].seq_id is None
    assert old.state is RequestState.RUNNING
    assert tokens_by_request(plan) == {"old": 1}  # nothing admitted in a preempting step
    # Recompute of prompt + the token it already has (49 tokens) as far as the 3 free pages go:
    # a partial chunk, so nothing is sampled and no token is produced twice.
    plan = run_step(s)
    assert tokens_by_request(plan) == {"old": 1, "new": 48}
    assert [e.sample_branches for e in plan.entries if e.request is new] == [()]
    assert new.branches[0].num_generated == 1 and new.num_preemptions == 1


def test_n_branches_fork_after_the_prompt_and_count_as_seats() -> None:
    s = make(max_seqs=4, chunk=64)
    req = submit(s, "n3", 40, n=3)
    other = submit(s, "n2", 8, n=2)
    plan = s.schedule()
    (entry,) = plan.entries  # n2 needs 2 seats, n3 holds 3 of 4: it waits
    assert other.state is RequestState.WAITING
    assert entry.token_ids == tuple(range(1, 41))
    assert len(entry.fork_seq_ids) == 2 and entry.sample_branches == (0, 1, 2)
    assert s.pool.num_used == 2 + 3  # 2 shared full pages + 3 partial copies
    assert {b.seq_id for b in req.branches} == {entry.seq_id, *entry.fork_seq_ids}


def test_alone_and_out_of_pages_ends_with_length() -> None:
    s = make(total_pages=2, chunk=64)
    req = submit(s, "big", 30, max_tokens=50)
    plan = run_step(s)
    for _ in range(3):
        plan = run_step(s)
        if plan.length_capped:
            break
    assert plan.length_capped == ((req, 0),)
    assert req.state is RequestState.FINISHED and s.pool.num_free == 2


def test_abort_frees_pages_at_the_next_boundary() -> None:
    s = make(chunk=64)
    req = submit(s, "a", 40, n=2)
    run_step(s)
    used = s.pool.num_used
    assert used > 0
    s.abort("a")
    s.abort("unknown")  # ignored
    assert s.pool.num_used == used  # not before the boundary
    plan = s.schedule()
    assert plan.aborted == (req,) and req.state is RequestState.ABORTED
    assert sorted(plan.removed_seq_ids) == [0, 1] and s.pool.num_used == 0
    assert not s.has_work()


def test_add_validation() -> None:
    s = make(total_pages=4, window=100)
    with pytest.raises(PromptTooLongError) as info:
        submit(s, "x", 101)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ContextLengthExceededError)
    with pytest.raises(PromptTooLongError):
        submit(s, "y", 70)  # 5 pages > 4 in the whole cache
    with pytest.raises(PromptTooLongError):
        submit(s, "z", 10, n=9)
    s = make(total_pages=16, window=60)
    full = submit(s, "w", 60)  # fills the window: no room for a single token
    assert full.state is RequestState.FINISHED and not s.has_work()
    clipped = submit(s, "v", 20, max_tokens=1000)
    assert clipped.max_new_tokens == 40  # clipped to the window
