"""PagePool mirrors an independently written cache (EchoRunner's) under any sequence of add,
append, fork (at any position), pop and remove; and the request state table is the only way to
move a request."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlctrio.engine.pages import OutOfPages, PagePool, pages_for
from mlctrio.engine.request import (
    _TRANSITIONS,
    IllegalTransition,
    Request,
    RequestEvent,
    RequestState,
)
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.errors import EngineError
from mlctrio.testing.echo import EchoRunner

from .echo_harness import check_pool_ownership

PAGE = 16
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "append", "fork", "pop", "remove"]),
        st.integers(0, 5),
        st.integers(0, 40),
    ),
    max_size=60,
)


@given(ops, st.integers(4, 24))
def test_pool_mirrors_echo_runner(operations: list[tuple[str, int, int]], total: int) -> None:
    pool = PagePool(total, PAGE)
    runner = EchoRunner(vocab_size=300, eos_token_id=256, total_pages=total, max_num_sequence=100)
    next_id = itertools.count()
    for op, pick, amount in operations:
        seqs = pool.seq_ids()
        target = seqs[pick % len(seqs)] if seqs else None
        if op == "add" or target is None:
            seq_id = next(next_id)
            pool.add(seq_id)
            runner.add_sequence(seq_id)
        elif op == "append" and amount > 0:
            fits = pool.pages_to_append(target, amount) <= pool.num_free
            assert fits == (amount <= pool.appendable_tokens(target))
            if not fits:
                with pytest.raises(OutOfPages):
                    pool.append(target, amount)
                continue
            pool.append(target, amount)
            runner.step([(target, [1] * amount)])
        elif op == "fork":
            pos = amount % (pool.length(target) + 1)
            if pool.pages_to_fork(target, pos) > pool.num_free:
                continue
            child = next(next_id)
            pool.fork(target, child, pos)
            runner.fork_sequence(target, child, pos)
        elif op == "pop":
            num = amount % (pool.length(target) + 1)
            pool.pop(target, num)
            runner.popn(target, num)
        elif op == "remove":
            pool.remove(target)
            runner.remove_sequence(target)
        assert pool.num_free == runner.free_pages()
        assert pool.num_used + pool.num_free == total
        check_pool_ownership(pool, shared_pages_full=False)
        for seq_id in pool.seq_ids():
            assert pool.length(seq_id) == runner.sequence_length(seq_id)
            assert len(pool.pages_of(seq_id)) == pages_for(pool.length(seq_id), PAGE)
    for seq_id in pool.seq_ids():
        pool.remove(seq_id)
    assert pool.num_free == total


def test_fork_shares_full_pages_and_copies_the_partial_one() -> None:
    pool = PagePool(10, PAGE)
    pool.add(0)
    pool.append(0, 40)  # 2 full pages + 8 tokens
    assert pool.num_used == 3
    pool.fork(0, 1)
    pool.fork(0, 2)
    assert pool.num_used == 5  # 2 shared + 3 partial pages
    assert pool.pages_of(1)[:2] == pool.pages_of(0)[:2]
    assert pool.pages_of(1)[2] != pool.pages_of(0)[2]
    pool.remove(0)
    assert pool.num_used == 4  # the shared pages live on in the children
    pool.fork(1, 3, 32)  # page-aligned fork: nothing copied
    assert pool.num_used == 4


def _request(n: int = 1) -> Request:
    spec = GenerationRequest("r", (1, 2, 3), SamplingParams(n=n))
    return Request.create(spec, max_new_tokens=5)


@pytest.mark.parametrize(("state", "event"), [(s, e) for s in RequestState for e in RequestEvent])
def test_state_table(state: RequestState, event: RequestEvent) -> None:
    req = _request()
    req.state = state
    if (state, event) in _TRANSITIONS:
        req.transition(event)
        assert req.state is _TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as info:
            req.transition(event)
        assert isinstance(info.value, EngineError)
        assert req.state is state  # an illegal event changes nothing


def test_terminal_states_have_no_exit() -> None:
    for (state, _), _ in _TRANSITIONS.items():
        assert state not in (RequestState.FINISHED, RequestState.ABORTED)


def test_branch_token_slice_spans_prompt_and_output() -> None:
    req = _request(n=2)
    branch = req.branches[1]
    branch.output.extend([7, 8])
    assert branch.token_slice(0, 5) == (1, 2, 3, 7, 8)
    assert branch.token_slice(2, 4) == (3, 7)
    assert branch.token_slice(4, 5) == (8,)
    assert branch.num_pending == 5 and req.branches[0].num_pending == 3
