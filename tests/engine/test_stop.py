"""Stop strings across token boundaries never leak; stop tokens and max_tokens end a choice."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mlctrio.engine.stop import StopMatcher, StopTokens, finish_for_token, named_eog_ids
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.testing.echo import ENDOFTEXT, IM_END, ByteTokenizer, build_echo_core

alphabet = st.sampled_from("abc世\n")
texts = st.text(alphabet, max_size=30)
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The whole text at once: the first stop string to be completed, the longest on a tie."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, minus_len, stop = min(hits)
    return text[: end + minus_len], stop


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(split_text(), stop_lists)
def test_stop_strings_split_across_chunks_never_leak(
    case: tuple[str, list[str]], stops: list[str]
) -> None:
    text, chunks = case
    want, want_stop = reference(text, stops)
    matcher = StopMatcher(stops)
    emitted = ""
    for chunk in chunks:
        emitted += matcher.push(chunk)
        # Everything emitted so far is part of the final output: nothing is ever taken back.
        assert want.startswith(emitted), (emitted, want)
        if matcher.matched is None:
            # What is held back is exactly a possible beginning of a stop string.
            held = text[len(emitted) : len(emitted) + len(matcher.held)]
            assert held == matcher.held
            assert not matcher.held or any(s.startswith(matcher.held) for s in stops)
    emitted += matcher.flush()
    assert (emitted, matcher.matched) == (want, want_stop)


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("abc</e") == "abc"
    assert matcher.held == "</e"
    assert matcher.push("x") == "</ex"  # not a stop after all: released in full
    assert matcher.push("</en") == ""
    assert matcher.push("d>tail") == ""
    assert matcher.matched == "</end>"
    assert matcher.push("more") == "" and matcher.flush() == ""


def test_first_completed_then_longest_stop_wins() -> None:
    matcher = StopMatcher(["abcd", "bc", "xabc"])
    # "bc" and "xabc" are completed at the same character, before "abcd": the longer one wins
    assert matcher.push("xabcd") == ""
    assert matcher.matched == "xabc"


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("a</") == "a</"
    assert matcher.flush() == ""


def test_stop_tokens_and_ignore_eos() -> None:
    rule = StopTokens.build([2], [7], [9], ignore_eos=False)
    assert rule.check(2) == (True, None)  # EOS: no stop_reason, as vLLM reports it
    assert rule.check(7) == (True, 7)
    assert rule.check(9) == (True, 9)
    assert rule.check(3) == (False, None)
    assert rule.banned_ids == frozenset()


def test_ignore_eos_ignores_and_bans_every_end_of_generation_token() -> None:
    # As llama.cpp: EOS, the template's stop ids and named EOG tokens neither stop nor get
    # sampled; only the request's own stop_token_ids still stop.
    ignoring = StopTokens.build([2], [7], [9], ignore_eos=True, eog_ids=[0, 2])
    assert ignoring.check(2) == (False, None)
    assert ignoring.check(7) == (False, None)
    assert ignoring.check(0) == (False, None)
    assert ignoring.check(9) == (True, 9)
    assert ignoring.banned_ids == {0, 2, 7}
    # a request that names an EOG id as its own stop token keeps it: it stops, is not banned
    explicit = StopTokens.build([2], [7], [7], ignore_eos=True)
    assert explicit.check(7) == (True, 7) and explicit.banned_ids == {2}
    # without ignore_eos the extra EOG ids change nothing
    assert StopTokens.build([2], [7], [], ignore_eos=False, eog_ids=[0]).check(0) == (False, None)


def test_named_eog_ids_follow_llama_cpp() -> None:
    specials = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 5: "<file_sep>",
                9: "<|eot_id|>", 10: "<end_of_turn>"}  # fmt: skip
    assert named_eog_ids(specials) == {0, 2, 9, 10}


def test_finish_for_token_prefers_stop_over_length() -> None:
    rule = StopTokens.build([2], [], [], ignore_eos=False)
    assert finish_for_token(rule, 2, 5, 5) == ("stop", None)
    assert finish_for_token(rule, 3, 5, 5) == ("length", None)
    assert finish_for_token(rule, 3, 4, 5) == (None, None)


def _run_echo(text: str, **params: object) -> tuple[list[int], str | None]:
    """(generated token ids, finish_reason) of one greedy echo request."""
    core, tok, _ = build_echo_core()
    request = GenerationRequest(
        "r", tuple(tok.encode(text)), SamplingParams(temperature=0.0, **params)
    )  # type: ignore[arg-type]
    core.add_request(request)
    ids: list[int] = []
    reason = None
    while core.has_work():
        for record in core.step():
            for delta in record.deltas:
                ids += delta.token_ids
                reason = delta.finish_reason or reason
    return ids, reason


def test_ignore_eos_in_the_engine_never_samples_an_end_of_generation_token() -> None:
    tok = ByteTokenizer()
    eos, im_end = tok.special_id(ENDOFTEXT), tok.special_id(IM_END)
    # The echo reaches the template's stop token (<|im_end|>) and stops there ...
    ids, reason = _run_echo(f"ab{IM_END}cd", max_tokens=10)
    assert (ids, reason) == ([*b"ab", im_end], "stop")
    # ... with ignore_eos it is banned (the echo's favourite becomes the lowest id) and so is EOS
    ids, reason = _run_echo(f"ab{IM_END}cd", max_tokens=10, ignore_eos=True)
    assert reason == "length" and len(ids) == 10
    assert ids[:2] == [*b"ab"] and ids[3:5] == [*b"cd"]
    assert eos not in ids and im_end not in ids
    # a stop token the request names itself still stops
    ids, reason = _run_echo(
        f"ab{IM_END}cd", max_tokens=10, ignore_eos=True, stop_token_ids=(im_end,)
    )
    assert (ids, reason) == ([*b"ab", im_end], "stop")
