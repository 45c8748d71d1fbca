"""EngineCore over the echo fake: the output contract seen by the server."""

from __future__ import annotations

import pytest

from mlctrio.engine.scheduler import PromptTooLongError
from mlctrio.engine.types import GenerationRequest, RequestOutput, SamplingParams
from mlctrio.errors import EngineError
from mlctrio.runtime.core import EngineCore
from mlctrio.testing.echo import IM_END, ByteTokenizer, EchoRunner, build_echo_core


def submit(core: EngineCore, tok: ByteTokenizer, rid: str, text: str, **params: object) -> None:
    prompt = tuple(tok.encode(text))
    core.add_request(GenerationRequest(rid, prompt, SamplingParams(**params)))  # type: ignore[arg-type]


def drain(core: EngineCore, max_steps: int = 10_000) -> list[list[RequestOutput]]:
    steps = []
    for _ in range(max_steps):
        if not core.has_work():
            return steps
        steps.append(core.step())
        assert core.scheduler.pool.num_free == core.runner.free_pages()
    raise AssertionError("engine did not drain")


def texts(steps: list[list[RequestOutput]], rid: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for step in steps:
        for record in step:
            if record.request_id == rid:
                for d in record.deltas:
                    out[d.index] = out.get(d.index, "") + d.text
    return out


def final(steps: list[list[RequestOutput]], rid: str) -> RequestOutput:
    records = [r for step in steps for r in step if r.request_id == rid and r.finished]
    assert len(records) == 1
    return records[0]


def finishes(steps: list[list[RequestOutput]], rid: str) -> dict[int, tuple[object, object]]:
    return {
        d.index: (d.finish_reason, d.stop_reason)
        for step in steps
        for r in step
        if r.request_id == rid
        for d in r.deltas
        if d.finish_reason
    }


def test_echo_length_stop_and_utf8() -> None:
    core, tok, _ = build_echo_core()
    submit(core, tok, "full", "héllo 世界")
    submit(core, tok, "short", "abcdef", max_tokens=3)
    submit(core, tok, "stop", "one STOP two", stop=("STOP",))
    submit(core, tok, "tok", f"ab{IM_END}cd")
    steps = drain(core)
    assert texts(steps, "full") == {0: "héllo 世界"}
    assert finishes(steps, "full") == {0: ("stop", None)}  # the EOS after the echo
    assert final(steps, "full").usage.completion_tokens == len(tok.encode("héllo 世界")) + 1
    assert texts(steps, "short") == {0: "abc"} and finishes(steps, "short") == {0: ("length", None)}
    assert texts(steps, "stop") == {0: "one "} and finishes(steps, "stop") == {0: ("stop", "STOP")}
    assert texts(steps, "tok") == {0: "ab"}
    assert finishes(steps, "tok") == {0: ("stop", tok.special_id(IM_END))}
    # multi-byte characters never split across deltas
    for step in steps:
        for record in step:
            for d in record.deltas:
                assert "\ufffd" not in d.text


def test_n3_three_choices_prompt_counted_and_computed_once() -> None:
    core, tok, _ = build_echo_core()
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    prompt = "forty bytes of prompt, give or take!!!!!"
    submit(core, tok, "n3", prompt, n=3, temperature=1.0, seed=7)
    steps = drain(core)
    assert texts(steps, "n3") == {0: prompt, 1: prompt, 2: prompt}
    usage = final(steps, "n3").usage
    num_prompt = len(tok.encode(prompt))
    assert usage.prompt_tokens == num_prompt
    assert usage.completion_tokens == 3 * (num_prompt + 1)
    # the prompt went through the model once; each choice then decoded its own tokens
    assert runner.num_tokens_total == num_prompt + 3 * num_prompt


def test_chunked_prefill_keeps_streams_flowing() -> None:
    core, tok, _ = build_echo_core(prefill_chunk_size=16)
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    submit(core, tok, "a", "a" * 40)
    submit(core, tok, "b", "b" * 40)
    started: set[str] = set()
    while started != {"a", "b"}:  # until both stream
        started |= {r.request_id for r in core.step()}
    submit(core, tok, "long", "L" * 300)
    for _ in range(20):  # 300 prompt tokens at 14 a step: still prefilling after 20 steps
        before = runner.num_tokens_total
        got = {r.request_id: sum(len(d.token_ids) for d in r.deltas) for r in core.step()}
        assert got == {"a": 1, "b": 1}  # nobody skipped; long is still prefilling
        assert runner.num_tokens_total - before == 16  # the prompt takes the rest of the budget


def test_preemption_output_equals_unpressured_output() -> None:
    prompts = {f"r{i}": ("xyz世" * 9)[: 20 + 5 * i] for i in range(5)}

    def run(total_pages: int) -> tuple[dict[str, dict[int, str]], int]:
        core, tok, _ = build_echo_core(total_pages=total_pages, context_window_size=128)
        for rid, text in prompts.items():
            submit(core, tok, rid, text, n=2, temperature=0.5)
        steps = drain(core)
        for rid in prompts:
            final(steps, rid)
        return {rid: texts(steps, rid) for rid in prompts}, core.stats().num_preemptions_total

    relaxed, no_preemptions = run(512)
    pressured, preemptions = run(17)
    assert no_preemptions == 0 and preemptions > 0
    assert pressured == relaxed


def test_abort_waiting_and_running() -> None:
    core, tok, _ = build_echo_core(max_num_sequence=1)
    submit(core, tok, "run", "a" * 50)
    submit(core, tok, "wait", "b" * 10)
    core.step()
    core.abort_request("run")
    core.abort_request("wait")
    core.abort_request("nobody")
    outputs = {r.request_id: r for r in core.step()}
    assert set(outputs) == {"run", "wait"}
    for record in outputs.values():
        assert record.finished and [d.finish_reason for d in record.deltas] == ["abort"]
    assert core.runner.free_pages() == core.runner.total_pages()
    assert not core.has_work()
    core.abort_request("run")  # finished: ignored
    assert core.step() == []


def test_runner_error_fails_the_batch_and_engine_lives_on() -> None:
    core, tok, _ = build_echo_core()
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    submit(core, tok, "a", "hello", n=2)
    core.step()
    runner.fail_next_step(RuntimeError("device lost"))
    (record,) = core.step()
    assert record.finished and record.error is not None and "device lost" in record.error
    assert [d.finish_reason for d in record.deltas] == ["error", "error"]
    assert runner.free_pages() == runner.total_pages() == core.stats().free_pages
    submit(core, tok, "b", "again")
    assert texts(drain(core), "b") == {0: "again"}


def test_logprobs_carry_token_strings_and_bytes() -> None:
    core, tok, _ = build_echo_core()
    submit(core, tok, "lp", "é", logprobs=True, top_logprobs=2)
    steps = drain(core)
    entries = [lp for s in steps for r in s for d in r.deltas for lp in (d.logprobs or ())]
    # The EOS that stopped the choice is not content, so it has no logprob entry (as OpenAI).
    assert [e.token_id for e in entries] == tok.encode("é")
    first = entries[0]
    assert first.bytes == (0xC3,) and first.token == "\ufffd"  # half a character
    assert first.logprob == pytest.approx(0.0)
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].token_id == first.token_id
    # With ignore_eos the EOS is banned (never sampled): the fake's runner-up, "~", follows.
    submit(core, tok, "lp2", "a", logprobs=True, max_tokens=3, ignore_eos=True)
    steps = drain(core)
    entries = [lp for s in steps for r in s for d in r.deltas for lp in (d.logprobs or ())]
    assert [e.token for e in entries] == ["a", "~", "~"]
    assert all(e.token_id not in tok.eos_token_ids for e in entries)


def test_add_validation_and_close() -> None:
    core, tok, _ = build_echo_core(context_window_size=32)
    with pytest.raises(PromptTooLongError):
        submit(core, tok, "big", "x" * 33)
    submit(core, tok, "exact", "x" * 32)  # fills the window: "length" with no token
    submit(core, tok, "live", "y" * 20)
    (done,) = [r for r in core.step() if r.request_id == "exact"]
    assert done.finished and [d.finish_reason for d in done.deltas] == ["length"]
    assert done.usage.completion_tokens == 0
    closing = core.close()
    assert [(r.request_id, r.finished, r.deltas[0].finish_reason) for r in closing] == [
        ("live", True, "abort")
    ]
    assert core.runner.free_pages() == core.runner.total_pages()
    assert isinstance(core.runner, EchoRunner) and core.runner.closed
    with pytest.raises(EngineError):
        submit(core, tok, "late", "z")
    stats = core.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage_ratio == 0.0


def test_launch_hook_runs_once_per_model_step_before_the_model() -> None:
    """The worker releases a step's outputs from this hook (service._run_worker): it must run
    once for every step that calls the model, before the model computes; unset, never."""
    core, tok, _ = build_echo_core(max_num_sequence=4)
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    seen: list[int] = []
    core.set_launch_hook(lambda: seen.append(runner.num_steps))  # steps completed so far
    submit(core, tok, "a", "hello", max_tokens=3)
    submit(core, tok, "b", "world!", max_tokens=2)
    steps = drain(core)
    assert runner.num_steps >= 3
    assert seen == list(range(runner.num_steps))  # before each model step, one call each
    core.set_launch_hook(None)
    submit(core, tok, "c", "x", max_tokens=1)
    drain(core)
    assert len(seen) == len(steps)
