"""Speculative decoding is exact: the same tokens (and logprobs) as plain decoding, whatever the
draft proposes, under greedy and seeded sampling, penalties, n > 1, stops, max_tokens and
min_tokens; the sampled distribution is the model's (a chi-square test on a small vocabulary);
rejected tokens leave no KV behind.

The model is a Markov fake over the echo machinery: the logits after a sequence depend on its
last token only (a fixed random table over six letters and EOS), so the exact distribution of
any output is known."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from mlctrio.engine.request import Branch
from mlctrio.engine.types import GenerationRequest, RequestOutput, SamplingParams
from mlctrio.runtime.core import EngineCore
from mlctrio.runtime.speculative import NgramDrafter, Proposer, Speculator
from mlctrio.testing.echo import EchoRunner, build_echo_core

from ..engine.echo_harness import check_mirror

LIVE = [ord(c) for c in "abcdef"]
EOS = 256  # ByteTokenizer's <|endoftext|>


def _table() -> np.ndarray:
    rng = np.random.default_rng(7)
    table = np.full((259, 259), -1e4, dtype=np.float32)
    table[:, LIVE] = rng.normal(0.0, 1.2, size=(259, len(LIVE)))
    table[:, EOS] = -2.5  # now and then a choice ends by itself
    return table


TABLE = _table()


class MarkovRunner(EchoRunner):
    """The echo fake's pages and sequences, with logits TABLE[last token]."""

    def _rows(self, at):  # type: ignore[no-untyped-def]
        return np.stack([TABLE[seq.tokens[length - 1]] for seq, length in at])


class NoiseProposer:
    """Drafts random letters: mostly rejected, sometimes right."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        return [[int(t) for t in self.rng.choice(LIVE, size=k)] for k in want]


class GreedyProposer:
    """Drafts the model's own greedy chain: every drafted token is right for a greedy choice."""

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        drafts = []
        for b, k in zip(branches, want, strict=True):
            last, draft = b.token_slice(b.num_tokens - 1, b.num_tokens)[0], []
            for _ in range(k):
                last = int(np.argmax(TABLE[last]))
                draft.append(last)
            drafts.append(draft)
        return drafts


def _core(proposer: Proposer | None, *, total_pages: int = 256, cache: bool = True) -> EngineCore:
    spec = None
    if proposer is not None:
        spec = Speculator("ngram", proposer, draft_length=3, max_batch=64)
    core, _, _ = build_echo_core(
        total_pages=total_pages,
        max_num_sequence=64,
        context_window_size=256,
        prefill_chunk_size=256,
        prefix_cache_mode="radix" if cache else "disable",
        speculator=spec,
        runner_class=MarkovRunner,
    )
    return core


def _run(core: EngineCore, requests: list[GenerationRequest]) -> dict[str, list[tuple]]:
    """Each request's choices: (token ids, logprobs, text, finish reason)."""
    for request in requests:
        core.add_request(request)
    out: dict[str, dict[int, list]] = {r.request_id: {} for r in requests}
    for _ in range(10_000):
        if not core.has_work():
            break
        records: list[RequestOutput] = core.step()
        check_mirror(core)
        for record in records:
            assert record.error is None
            for d in record.deltas:
                choice = out[record.request_id].setdefault(d.index, [[], [], "", None])
                choice[0].extend(d.token_ids)
                choice[1].extend((lp.token_id, round(lp.logprob, 5)) for lp in d.logprobs or ())
                choice[2] += d.text
                choice[3] = d.finish_reason or choice[3]
    assert not core.has_work()
    return {rid: [tuple(c[i] if i > 1 else tuple(c[i]) for i in range(4)) for _, c in
                  sorted(choices.items())] for rid, choices in out.items()}  # fmt: skip


PARAMS = [
    SamplingParams(temperature=0, max_tokens=40),
    SamplingParams(temperature=1.0, max_tokens=40, logprobs=True, top_logprobs=2),
    SamplingParams(temperature=0.7, top_p=0.8, max_tokens=30, n=2),
    SamplingParams(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.5, max_tokens=30),
    SamplingParams(temperature=1.0, stop=("ca", "fe"), max_tokens=40),
    SamplingParams(temperature=0.9, min_tokens=12, max_tokens=13, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=25),
]


def _requests(seed_base: int) -> list[GenerationRequest]:
    prompts = ["abcab", "fedcba fed", "aaaa", "cab"]
    return [
        GenerationRequest(
            f"r{k}-{j}",
            tuple(p.encode()),
            SamplingParams(**{**_fields(params), "seed": seed_base + 10 * k + j}),
        )
        for k, params in enumerate(PARAMS)
        for j, p in enumerate(prompts)
    ]


def _fields(params: SamplingParams) -> dict:
    import attrs

    return attrs.asdict(params, recurse=False)


@pytest.mark.parametrize(
    "proposer",
    [NgramDrafter(), NoiseProposer(1), GreedyProposer()],
    ids=["ngram", "noise", "greedy"],
)
def test_output_is_the_plain_decoders_whatever_the_draft(proposer: Proposer) -> None:
    requests = _requests(seed_base=100)
    plain = _run(_core(None), requests)
    core = _core(proposer)
    drafted = _run(core, requests)
    assert drafted == plain
    stats = core._spec.stats  # type: ignore[union-attr]
    assert stats.num_drafts > 20 and stats.num_accepted_tokens > 0
    if isinstance(proposer, NoiseProposer):
        assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections happened
    # nothing but the prefix cache holds pages once all is done, and closing frees them all
    core.close()
    assert core.runner.free_pages() == core.runner.total_pages()


def test_a_draft_equal_to_the_model_is_always_accepted_when_greedy() -> None:
    core = _core(GreedyProposer())
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    _run(core, [GenerationRequest(f"g{i}", tuple(p.encode()), params)
                for i, p in enumerate(["abc", "fff", "dab"])])  # fmt: skip
    stats = core._spec.stats  # type: ignore[union-attr]
    assert stats.num_drafts > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    # 30 tokens each at up to 4 per step: far fewer steps than tokens
    assert core.stats().num_steps_total < 3 * 30 / 2


def test_drafting_under_page_pressure_keeps_the_mirror_and_the_output() -> None:
    requests = _requests(seed_base=7)[:12]
    plain = _run(_core(None, total_pages=24, cache=False), requests)
    core = _core(NoiseProposer(3), total_pages=24, cache=False)
    assert _run(core, requests) == plain
    assert core.scheduler.num_preemptions_total > 0  # the pressure was real
    assert core.runner.free_pages() == core.runner.total_pages()


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_sampled_pairs_follow_the_models_distribution() -> None:
    """Tokens after "c", sampled at temperature 1 with a draft that is often wrong (the second
    token is drafted): the counts of each first pair match p(t1 | c) p(t2 | t1) (chi-square,
    p = 0.001)."""
    n = 3000
    core = _core(NoiseProposer(11), total_pages=512, cache=False)
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=s)
              for s in range(n)]  # fmt: skip
    outputs = _run(core, [GenerationRequest(f"s{i}", (ord("c"),), p) for i, p in enumerate(params)])
    counts = Counter(tuple(choices[0][0][:2]) for choices in outputs.values())
    stats = core._spec.stats  # type: ignore[union-attr]
    assert stats.num_drafts > n // 2 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens

    def probs(prev: int) -> np.ndarray:
        row = TABLE[prev, LIVE].astype(np.float64)  # EOS is banned (ignore_eos)
        e = np.exp(row - row.max())
        return e / e.sum()

    first = probs(ord("c"))
    chi2 = 0.0
    for i, t1 in enumerate(LIVE):
        second = probs(t1)
        for j, t2 in enumerate(LIVE):
            expected = n * first[i] * second[j]
            chi2 += (counts.get((t1, t2), 0) - expected) ** 2 / expected
    assert sum(counts.values()) == n
    assert chi2 < _chi2_critical(len(LIVE) ** 2 - 1)
