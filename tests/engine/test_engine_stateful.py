"""Hypothesis state machine over EngineCore + EchoRunner: any interleaving of submits, steps and
aborts keeps the page mirror exact, ends every request exactly once, frees an aborted request's
pages within one step, and — under any page pressure and preemption — produces exactly the output
the echo reference predicts, with and without speculative drafts. With the prefix cache on
(prompts then often share prefixes with earlier ones) the same holds, the cache always mirrors
the runner's sequences, evictions keep it within its budgets, and close() frees every page."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mlctrio.engine.scheduler import PromptTooLongError
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.runtime.speculative import NgramDrafter, Speculator
from mlctrio.testing.echo import EchoRunner, build_echo_core

from .echo_harness import Collector, check_mirror, expected_echo

# Stop tokens in a prompt end its echo early: keep them rare (1 draw in 40 each).
FRAGMENTS = [*["a", "b", " ", "xy", "é", "世", "\n", "cd"] * 5, "<|im_end|>", "<|endoftext|>"]
# Mostly 10-40 fragments (pressure needs long echoes); now and then one too long for the window.
prompts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=45).map("".join)
stops = st.lists(st.sampled_from(["b ", "世", "ab", "xyz", "é\n", "a"]), max_size=2).map(tuple)
WINDOW = 64
N_MAX = 3


class EngineMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    @initialize(
        spare_pages=st.integers(0, 10),
        chunk=st.integers(4, 80),
        max_seqs=st.integers(N_MAX, 7),
        cache_mode=st.sampled_from(["radix", "radix", "disable"]),
        max_cached=st.integers(1, 4),
        drafts=st.sampled_from([None, None, 1, 4]),
    )
    def start(
        self,
        spare_pages: int,
        chunk: int,
        max_seqs: int,
        cache_mode: str,
        max_cached: int,
        drafts: int | None,
    ) -> None:
        # Every request fits alone (n branches of a full window), so nothing is ever cut short
        # for lack of pages: pressure may only cause preemption, never change the output.
        total = N_MAX * (WINDOW // 16) + spare_pages
        self.core, self.tokenizer, _ = build_echo_core(
            total_pages=total,
            max_num_sequence=max_seqs,
            context_window_size=WINDOW,
            prefill_chunk_size=chunk,
            prefix_cache_mode="radix" if cache_mode == "radix" else "disable",
            prefix_cache_max_num_recycling_seqs=max_cached,
            # speculative decoding (n-gram drafts of `drafts` tokens) must change nothing
            speculator=(
                Speculator("ngram", NgramDrafter(), draft_length=drafts, max_batch=max_seqs)
                if drafts
                else None
            ),
        )
        self.cache_on = cache_mode == "radix"
        self.collector = Collector()
        self.texts: list[str] = []  # prompts submitted so far, for prompts sharing a prefix
        self.params: dict[str, tuple[tuple[int, ...], SamplingParams]] = {}
        self.aborted: set[str] = set()
        self.abort_pending: set[str] = set()
        self.counter = 0

    @rule(
        target=requests,
        text=prompts,
        n=st.integers(1, N_MAX),
        max_tokens=st.none() | st.integers(1, 50),
        stop=stops,
        ignore_eos=st.booleans(),
    )
    def submit(
        self, text: str, n: int, max_tokens: int | None, stop: tuple[str, ...], ignore_eos: bool
    ) -> str:
        self.texts.append(text)
        return self._submit(tuple(self.tokenizer.encode(text)), n, max_tokens, stop, ignore_eos)

    @precondition(lambda self: bool(self.texts))
    @rule(
        target=requests,
        pick=st.integers(0, 10**6),
        keep=st.integers(0, WINDOW),
        text=prompts,
        n=st.integers(1, N_MAX),
        max_tokens=st.none() | st.integers(1, 50),
        ignore_eos=st.booleans(),
    )
    def submit_sharing_a_prefix(
        self, pick: int, keep: int, text: str, n: int, max_tokens: int | None, ignore_eos: bool
    ) -> str:
        """A prompt that starts like an earlier one (possibly all of it, possibly more)."""
        base = self.texts[pick % len(self.texts)]
        shared = base[:keep] + text[: keep % 5 * 4] or base  # (cut at characters, not bytes)
        self.texts.append(shared)
        return self._submit(tuple(self.tokenizer.encode(shared)), n, max_tokens, (), ignore_eos)

    def _submit(
        self,
        prompt: tuple[int, ...],
        n: int,
        max_tokens: int | None,
        stop: tuple[str, ...],
        ignore_eos: bool,
    ) -> str:
        self.counter += 1
        request_id = f"r{self.counter}"
        params = SamplingParams(
            n=n, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos, temperature=0.8
        )
        request = GenerationRequest(request_id, prompt, params)
        if len(prompt) > WINDOW:
            with pytest.raises(PromptTooLongError):
                self.core.add_request(request)
            return request_id
        self.core.add_request(request)
        self.collector.expect(request_id, n)
        self.params[request_id] = (prompt, params)
        return request_id

    @rule(steps=st.integers(1, 8))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            self._step()

    @rule()
    def run_until_idle(self) -> None:
        """Let everything finish, so the next prompts meet a full prefix cache."""
        for _ in range(500):
            if not self.core.has_work():
                break
            self._step()

    @rule(request_id=requests, coin=st.integers(0, 2))
    def abort(self, request_id: str, coin: int) -> None:
        if coin:  # abort one time in three, so that most requests run to their end
            return
        self.core.abort_request(request_id)
        log = self.collector.logs.get(request_id)
        if log is not None and log.final is None:
            self.abort_pending.add(request_id)

    @rule()
    def abort_unknown(self) -> None:
        self.core.abort_request("no-such-request")

    @precondition(lambda self: hasattr(self, "core"))
    @invariant()
    def mirror(self) -> None:
        check_mirror(self.core)
        stats = self.core.stats()
        assert stats.free_pages == self.core.runner.free_pages()
        assert stats.total_pages == self.core.runner.total_pages()

    def _step(self) -> None:
        pending = set(self.abort_pending)
        self.collector.feed(self.core.step())
        for request_id in pending:
            log = self.collector.logs[request_id]
            # An abort takes effect at the next step boundary: the final record is out, and the
            # request holds no sequence any more.
            assert log.final is not None, f"{request_id} not ended one step after abort"
            if any(c.finish_reason == "abort" for c in log.choices.values()):
                self.aborted.add(request_id)
            assert self.core.scheduler.get(request_id) is None
        self.abort_pending -= pending
        check_mirror(self.core)

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        for _ in range(5000):
            if not self.core.has_work():
                break
            self._step()
        assert not self.core.has_work(), "the engine did not drain"
        assert self.collector.unfinished() == []
        runner = self.core.runner
        stats = self.core.stats()
        if self.cache_on:
            cache = self.core.scheduler.prefix_cache
            assert cache is not None
            event(f"prefix cache hits: {bool(stats.num_prefix_cache_hit_tokens_total)}")
            event(f"prefix cache evictions: {bool(cache.num_evictions_total)}")
            event(f"prefix cache with preemptions: {bool(stats.num_preemptions_total)}")
            assert runner.free_pages() + stats.num_cached_pages == runner.total_pages()
            assert (
                stats.num_prefix_cache_hit_tokens_total <= stats.num_prefix_cache_query_tokens_total
            )
            self.core.close()  # cached sequences go too
            assert isinstance(runner, EchoRunner) and runner.sequence_ids() == []
        else:
            assert stats.num_cached_pages == stats.num_prefix_cache_query_tokens_total == 0
        assert runner.free_pages() == runner.total_pages()
        for request_id, (prompt, params) in self.params.items():
            log = self.collector.logs[request_id]
            assert log.final is not None and log.final.usage.prompt_tokens == len(prompt)
            cached = log.final.usage.cached_tokens
            assert cached < len(prompt) if self.cache_on else cached == 0
            if request_id in self.aborted:
                continue
            want = expected_echo(self.tokenizer, prompt, params, WINDOW)
            for index, choice in log.choices.items():
                got = (choice.text, choice.finish_reason, choice.stop_reason, len(choice.token_ids))
                assert got == (want.text, want.finish_reason, want.stop_reason, want.num_tokens), (
                    request_id,
                    index,
                )


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
