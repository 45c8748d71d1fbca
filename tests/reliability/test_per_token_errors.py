"""Issue 16, item 5 (engine side): an exception in one request's per-token work (detokenizing, stop
flush, logprobs, grammar mask or advance) fails that request only — one final record with `error`,
its pages freed once, the scheduler rid of it — while the other requests of the same batch finish
normally and the engine keeps serving. And the concrete cause: a model whose logits are wider
than its tokenizer never yields a padding id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mlctrio.config import EngineConfig, PrefixCacheMode
from mlctrio.engine.types import GenerationRequest, OutputConstraint, SamplingParams
from mlctrio.runtime.core import EngineCore
from mlctrio.runtime.sampler import sampling_vocab_size
from mlctrio.testing.echo import ByteDetokenizer, ByteTokenizer, EchoRunner, RawChatTemplate

from ..engine.echo_harness import Collector, check_mirror

POISON = 0x01  # a byte the fakes below choke on


class PoisonTokenizer(ByteTokenizer):
    """The echo tokenizer, failing on POISON at one place: "push" (detokenizer), "flush"
    (detokenizer flush once POISON was pushed) or "logprobs" (token_bytes)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def token_bytes(self, token_id: int) -> bytes:
        if self.where == "logprobs" and token_id == POISON:
            raise ValueError("poisoned token_bytes")
        return super().token_bytes(token_id)

    def detokenizer(self, skip_special_tokens: bool = True) -> PoisonDetokenizer:
        return PoisonDetokenizer(self.where, skip_special_tokens)


class PoisonDetokenizer(ByteDetokenizer):
    def __init__(self, where: str, skip_special_tokens: bool) -> None:
        super().__init__(ByteTokenizer(), skip_special_tokens)  # (token_bytes may be poisoned)
        self.where, self.saw_poison = where, False

    def push(self, token_id: int) -> str:
        if token_id == POISON:
            self.saw_poison = True
            if self.where == "push":
                raise ValueError("poisoned push")
        return super().push(token_id)

    def flush(self) -> str:
        if self.where == "flush" and self.saw_poison:
            raise ValueError("poisoned flush")
        return super().flush()


def make_core(
    tokenizer: ByteTokenizer,
    *,
    runner: EchoRunner | None = None,
    prefix_cache_mode: PrefixCacheMode = "disable",
    constraints: Any = None,
) -> EngineCore:
    runner = runner or EchoRunner(
        vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_ids[0], total_pages=64
    )
    config = EngineConfig(
        model="mock://echo",
        max_num_sequence=runner.max_num_sequence,
        prefill_chunk_size=512,
        context_window_size=runner.context_window_size,
        kv_page_size=runner.page_size,
        prefix_cache_mode=prefix_cache_mode,
    )
    stops = RawChatTemplate().stop_token_ids
    return EngineCore(
        runner, tokenizer, config, extra_stop_token_ids=stops, constraints=constraints
    )


def submit(
    core: EngineCore, collector: Collector, rid: str, prompt: Sequence[int], **params: Any
) -> None:
    spec = SamplingParams(**params)
    core.add_request(GenerationRequest(rid, tuple(prompt), spec))
    collector.expect(rid, spec.n)


def drain(core: EngineCore, collector: Collector) -> int:
    """Step until idle, checking the output contract and the page mirror at every step; returns
    the number of steps."""
    for steps in range(1, 1000):
        collector.feed(core.step())
        check_mirror(core)
        if not core.has_work():
            return steps
    raise AssertionError("the engine did not drain")


def assert_idle_and_clean(core: EngineCore) -> None:
    runner = core.runner
    stats = core.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert runner.free_pages() + stats.num_cached_pages == runner.total_pages()
    assert stats.free_pages == runner.free_pages()


def enc(text: str) -> list[int]:
    return list(text.encode())


@pytest.mark.parametrize("where", ["push", "flush", "logprobs"])
@pytest.mark.parametrize("prefix_cache_mode", ["disable", "radix"])
def test_one_poisoned_request_fails_alone(where: str, prefix_cache_mode: PrefixCacheMode) -> None:
    tok = PoisonTokenizer(where)
    core = make_core(tok, prefix_cache_mode=prefix_cache_mode)
    collector = Collector()
    lp = {"logprobs": True, "top_logprobs": 1}  # (the runner-up of every echo step is 0x00)
    submit(core, collector, "before", enc("first healthy prompt"), **lp)
    submit(core, collector, "bad", [*enc("ab"), POISON, *enc("cd")], n=2, **lp)
    submit(core, collector, "after", enc("second healthy one"), n=2, **lp)
    drain(core, collector)

    bad = collector.logs["bad"]
    assert bad.final is not None and bad.final.error is not None
    assert "poisoned" in bad.final.error
    assert {c.finish_reason for c in bad.choices.values()} == {"error"}
    if where != "flush":  # nothing past the poisoned token was generated for it
        assert all(len(c.token_ids) <= 3 for c in bad.choices.values())
    for rid, text in (("before", "first healthy prompt"), ("after", "second healthy one")):
        log = collector.logs[rid]
        assert log.final is not None and log.final.error is None, rid
        for choice in log.choices.values():
            assert (choice.text, choice.finish_reason) == (text, "stop"), rid
    assert core.stats().num_requests_failed_total == 1
    assert core.scheduler.get("bad") is None
    assert_idle_and_clean(core)
    if prefix_cache_mode == "radix":  # a failed request's KV is not trusted: never cached
        cache = core.scheduler.prefix_cache
        assert cache is not None
        assert all(POISON not in cache.tree.tokens(s) for s in cache.seq_ids())

    # The engine serves on, the poisoned request's id included.
    submit(core, collector, "later", enc("still alive"))
    drain(core, collector)
    assert collector.logs["later"].choices[0].text == "still alive"
    assert_idle_and_clean(core)


class FakeMatcher:
    """A grammar matcher that allows every token, failing at `fail_at` ("mask": filling its
    bitmask, "advance": accepting POISON)."""

    def __init__(self, num_words: int, fail_at: str) -> None:
        self.num_words, self.fail_at = num_words, fail_at

    def fill_bitmask(self, row: npt.NDArray[np.int32]) -> None:
        if self.fail_at == "mask":
            raise RuntimeError("poisoned mask")
        row[:] = -1  # every bit set: everything allowed

    def accept_token(self, token_id: int) -> bool:
        if self.fail_at == "advance" and token_id == POISON:
            raise RuntimeError("poisoned advance")
        return True

    def is_stopped(self) -> bool:
        return False

    def is_terminated(self) -> bool:
        return False


class FakeConstraints:
    def __init__(self, num_words: int) -> None:
        self.num_words = num_words

    def matcher(self, constraint: OutputConstraint) -> FakeMatcher:
        return FakeMatcher(self.num_words, constraint.schema)


@pytest.mark.parametrize("fail_at", ["mask", "advance"])
def test_a_failing_grammar_fails_only_its_request(fail_at: str) -> None:
    tok = ByteTokenizer()
    core = make_core(tok, constraints=FakeConstraints(-(-tok.vocab_size // 32)))
    collector = Collector()
    fine = OutputConstraint("json_object", schema="never")
    broken = OutputConstraint("json_object", schema=fail_at)
    submit(core, collector, "free", enc("plain text"))
    submit(core, collector, "ok", enc("constrained"), constraint=fine)
    prompt = [*enc("x"), POISON, *enc("y")] if fail_at == "advance" else enc("xyz")
    submit(core, collector, "bad", prompt, n=2, constraint=broken)
    drain(core, collector)

    bad = collector.logs["bad"]
    assert bad.final is not None and bad.final.error is not None
    assert f"poisoned {fail_at}" in bad.final.error
    assert {c.finish_reason for c in bad.choices.values()} == {"error"}
    for rid, text in (("free", "plain text"), ("ok", "constrained")):
        log = collector.logs[rid]
        assert log.final is not None and log.final.error is None
        assert (log.choices[0].text, log.choices[0].finish_reason) == (text, "stop")
    assert_idle_and_clean(core)


class PaddedEchoRunner(EchoRunner):
    """The echo model with a logits row wider than its tokenizer, the padding scoring highest."""

    def __init__(self, tokenizer: ByteTokenizer, padding: int) -> None:
        super().__init__(
            vocab_size=tokenizer.vocab_size + padding, eos_token_id=tokenizer.eos_token_ids[0]
        )
        self.tokenizer_vocab = tokenizer.vocab_size

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        logits = super().step(batch)
        logits[:, self.tokenizer_vocab :] = 10.0  # above the echoed token's 0.0
        return logits


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 1},
        {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "seed": 2},
        {"temperature": 0.0, "logprobs": True, "top_logprobs": 5},
    ],
)
def test_padding_ids_are_never_sampled(params: dict[str, Any]) -> None:
    tok = ByteTokenizer()
    runner = PaddedEchoRunner(tok, padding=61)
    core = make_core(tok, runner=runner)
    collector = Collector()
    submit(core, collector, "r", enc("héllo"), n=2, **params)
    drain(core, collector)
    log = collector.logs["r"]
    assert log.final is not None and log.final.error is None
    for choice in log.choices.values():
        assert (choice.text, choice.finish_reason) == ("héllo", "stop")
        assert all(0 <= t < tok.vocab_size for t in choice.token_ids)
    assert_idle_and_clean(core)


def test_sampling_vocab_size_keeps_gapped_special_ids() -> None:
    class Gapped(ByteTokenizer):
        special_token_ids = frozenset({300})  # an added token past the count (a gap in ids)

    tok = ByteTokenizer()
    assert sampling_vocab_size(tok.vocab_size + 64, tok) == tok.vocab_size
    assert sampling_vocab_size(tok.vocab_size - 9, tok) == tok.vocab_size - 9
    assert sampling_vocab_size(512, Gapped()) == 301
