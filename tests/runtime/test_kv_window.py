"""Sliding windows that release KV pages (issue 14): a model whose every layer slides (Mistral)
keeps at most its window of tokens per sequence once the sequence passes it, and still computes
exactly what transformers computes.

The checkpoint is tests/data/families/mistral (2 layers, window 16, transformers' reference
outputs in reference.json; prompts up to 53 tokens, over three windows). A sequence put in the
cache's sliding mode (`enable_sliding_window`) releases the pages wholly before its window; its
attention is unchanged because the cache rotates keys inline by their position within what it
holds, which moves q and k alike (docs/discussion/0011). The engine's page mirror
(engine/pages.py) must count exactly what the cache does, step after step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from mlctrio.config import EngineConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.models.artifact import load_params, open_artifact
from mlctrio.models.compile import compile_model
from mlctrio.runtime.core import EngineCore
from mlctrio.runtime.tvm_runner import TVMRunner
from mlctrio.testing.echo import ByteTokenizer, RawChatTemplate

pytestmark = pytest.mark.slow

MISTRAL = Path(__file__).parent.parent / "data" / "families" / "mistral"
WINDOW, PAGE, CHUNK = 16, 16, 7
# A window of 16 tokens spans at most two pages (one when aligned): window + one page.
MOST_PAGES = WINDOW // PAGE + 1


def _runner(lib_cache_dir: Path, sink: int = 0, **kw: Any) -> TVMRunner:
    art = open_artifact(MISTRAL)
    config = art.config.with_attention_sinks(sink) if sink else art.config
    cm = compile_model(config, art.quantization, cache_dir=lib_cache_dir)
    return TVMRunner(
        cm.lib_path,
        load_params(art, cm.params),
        config,
        max_num_sequence=kw.get("max_num_sequence", 8),
        max_total_seq_length=kw.get("max_total_seq_length", 1024),
        prefill_chunk_size=64,
    )


@pytest.fixture(scope="module")
def runner(lib_cache_dir: Path) -> TVMRunner:
    return _runner(lib_cache_dir)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads((MISTRAL / "reference.json").read_text())


def _held(runner: TVMRunner) -> int:
    return runner.total_pages() - runner.free_pages()


def _generate(runner: TVMRunner, prompt: list[int], n: int, *, slide: bool) -> tuple:
    """(last prompt logits, n greedy tokens, most pages held after any step) of one sequence
    alone in the cache, prefilled in chunks of CHUNK."""
    runner.add_sequence(0)
    try:
        if slide:
            runner.enable_sliding_window(0)
        most = 0
        for i in range(0, len(prompt), CHUNK):
            logits = runner.step([(0, prompt[i : i + CHUNK])])[0]
            most = max(most, _held(runner))
        first = logits
        tokens = [int(np.argmax(logits))]
        while len(tokens) < n:
            tokens.append(int(np.argmax(runner.step([(0, [tokens[-1]])])[0])))
            most = max(most, _held(runner))
        return first, tokens, most
    finally:
        runner.remove_sequence(0)


def test_the_cache_of_an_all_sliding_model_has_a_window(runner: TVMRunner) -> None:
    assert runner.kv_window == (WINDOW, 0)
    gemma = open_artifact(MISTRAL.parent / "gemma3_text").config
    assert gemma.has_sliding_layers and gemma.kv_window is None  # global layers, own RoPE


def test_slid_sequences_compute_what_transformers_does(runner, reference) -> None:
    for k, (prompt, top5, greedy) in enumerate(
        zip(reference["prompts"], reference["top5"], reference["greedy"], strict=True)
    ):
        logits, tokens, most = _generate(runner, prompt, len(greedy), slide=True)
        x = logits.astype(np.float64) - logits.max()
        lp = x - np.log(np.exp(x).sum())
        for token, want in top5:
            assert abs(lp[int(token)] - want) <= 2e-3, (k, token, lp[int(token)], want)
        assert tokens == greedy, f"prompt {k} ({len(prompt)} tokens)"
        assert most <= MOST_PAGES, f"prompt {k}: {most} pages held"


def test_four_windows_of_generation_hold_one_window(runner, reference) -> None:
    prompt = reference["prompts"][3]  # 53 tokens
    n = 4 * WINDOW
    _, plain, plain_most = _generate(runner, prompt, n, slide=False)
    _, slid, slid_most = _generate(runner, prompt, n, slide=True)
    assert slid == plain
    assert slid_most <= MOST_PAGES
    assert plain_most == -(-(len(prompt) + n - 1) // PAGE)  # every position, without the mode


def test_attention_sinks_stay_visible_and_held(runner, lib_cache_dir: Path, reference) -> None:
    """With 4 sinks the first token still matters three windows later; without, it cannot (2
    layers of a 16-token window see back 30 positions). The cache holds the sinks' page too."""
    sinks = _runner(lib_cache_dir, sink=4)
    assert sinks.kv_window == (WINDOW + 4, 4)  # tokens kept: the sinks and the window
    prompt = reference["prompts"][3] + list(range(3, 40))  # 90 tokens
    changed = [(prompt[0] + 1) % 512, *prompt[1:]]
    for r, sees_first in ((runner, False), (sinks, True)):
        a, _, most = _generate(r, prompt, 2 * WINDOW, slide=True)
        b, _, _ = _generate(r, changed, 2 * WINDOW, slide=True)
        assert (not np.allclose(a, b, atol=1e-6)) == sees_first
        assert most <= MOST_PAGES + (1 if sees_first else 0)


def _core(
    runner: TVMRunner, *, window: bool, prefix_cache: bool, speculator: Any = None
) -> EngineCore:
    tok = ByteTokenizer()
    config = EngineConfig(
        model="test://mistral",
        max_num_sequence=runner.max_num_sequence,
        prefill_chunk_size=CHUNK,
        context_window_size=256,
        kv_page_size=runner.page_size,
        prefix_cache_mode="radix" if prefix_cache else "disable",
    )
    if not window:
        runner = _NoWindow(runner)  # type: ignore[assignment]
    stops = RawChatTemplate().stop_token_ids
    return EngineCore(runner, tok, config, extra_stop_token_ids=stops, speculator=speculator)


@attrs.define
class _NoWindow:
    """The runner with its window mode hidden: the engine never slides (same library)."""

    inner: TVMRunner
    kv_window: None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _serve(core: EngineCore, requests: list[tuple[str, list[int], dict[str, Any]]]) -> dict:
    for rid, prompt, params in requests:
        core.add_request(GenerationRequest(rid, tuple(prompt), SamplingParams(**params)))
    out: dict[str, dict[int, list[int]]] = {}
    most = 0
    for _ in range(2000):
        for o in core.step():
            assert o.error is None, o.error
            for d in o.deltas:
                out.setdefault(o.request_id, {}).setdefault(d.index, []).extend(d.token_ids)
        pool = core.scheduler.pool
        assert pool.num_free == core.runner.free_pages()
        cache = core.scheduler.prefix_cache
        for seq in cache.seq_ids() if cache else ():
            assert not pool.is_sliding(seq)
        most = max(most, pool.num_used)
        if not core.has_work():
            return {"tokens": out, "most": most}
    raise AssertionError("the engine did not finish")


def test_the_engine_slides_what_it_may_and_its_mirror_follows(lib_cache_dir, reference) -> None:
    """Through the scheduler: a long generation alone (slides), n=2 choices (forked: never
    slide), and a repeat of the first prompt (a prefix-cache hit: a fork, no slide; the slid
    sequence itself is never cached). The mirror equals the cache after every step, and every
    request gets the tokens the engine computes without the mode."""
    p0, p1 = reference["prompts"][3], reference["prompts"][2]  # 53 and 23 tokens
    greedy = {"temperature": 0.0, "ignore_eos": True}
    requests = [
        ("long", p0, {**greedy, "max_tokens": 4 * WINDOW}),
        ("two", p1, {**greedy, "max_tokens": 24, "n": 2}),
        ("short", p1[:10], {**greedy, "max_tokens": 4}),
    ]

    def core(window: bool = True) -> EngineCore:  # a cache of its own each (prefix cache)
        return _core(_runner(lib_cache_dir), window=window, prefix_cache=True)

    slid = _serve(core(), requests[:1])
    assert slid["most"] <= MOST_PAGES
    assert _serve(core(window=False), requests[:1])["most"] > 3 * MOST_PAGES  # it did slide
    both = _serve(core(), requests)
    plain = _serve(core(window=False), requests)
    assert both["tokens"] == plain["tokens"]
    assert slid["tokens"]["long"] == plain["tokens"]["long"]
    # A slid sequence is not cached; a cached (forked) one is reused by a fork that then
    # generates past the window without sliding, and computes what the plain engine does.
    hits = []
    for window in (True, False):
        engine = core(window)
        _serve(engine, requests[:2])
        assert engine.scheduler.prefix_cache is not None
        cached = engine.scheduler.prefix_cache.num_hit_tokens_total
        hits.append(_serve(engine, [("hit", p1, {**greedy, "max_tokens": 30})])["tokens"])
        assert engine.scheduler.prefix_cache.num_hit_tokens_total - cached == len(p1) - 1
    assert hits[0] == hits[1]


@pytest.mark.parametrize("sink", [0, 4])
def test_the_page_mirror_counts_what_the_cache_holds(runner, lib_cache_dir, sink: int) -> None:
    """Appends of random sizes (a token to over a window) to sliding and plain sequences at
    once: engine/pages.py's PagePool frees and takes exactly the cache's pages each step."""
    from mlctrio.engine.pages import PagePool

    r = _runner(lib_cache_dir, sink=4) if sink else runner
    pool = PagePool(r.total_pages(), PAGE, window=WINDOW + sink, sink=sink)
    rng = np.random.default_rng(sink)
    seqs = {0: True, 1: True, 2: False}  # seq id: windowable
    for seq, windowable in seqs.items():
        r.add_sequence(seq)
        pool.add(seq, windowable=windowable)
    try:
        for _ in range(12):  # (the model's context is 256 tokens)
            sizes = rng.integers(1, 20, 2)
            batch = [
                (s, [int(t) for t in rng.integers(3, 500, n)])
                for s, n in zip((0, 1), sizes, strict=True)
            ]
            if rng.random() < 0.5:
                batch.append((2, [5]))
            for s, ids in batch:
                if pool.append(s, len(ids)):
                    r.enable_sliding_window(s)
            r.step(batch)
            assert pool.num_free == r.free_pages()
        assert pool.is_sliding(0) and pool.is_sliding(1) and not pool.is_sliding(2)
        assert max(len(pool.pages_of(s)) for s in (0, 1)) <= MOST_PAGES + (1 if sink else 0)
    finally:
        for seq in seqs:
            r.remove_sequence(seq)


def test_a_cache_smaller_than_a_request_serves_it_by_sliding(lib_cache_dir, reference) -> None:
    """The memory win: a 64-token KV cache (9 pages with the cache's spares) serves a 53-token
    prompt plus 150 tokens (prefix cache on: the repeat takes no fork it could not finish), with
    the tokens of an engine whose cache holds everything; two choices (forks, which cannot
    slide) are cut short for pages instead."""
    prompt = reference["prompts"][3]
    params = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 150}
    small = _core(
        _runner(lib_cache_dir, max_total_seq_length=64, max_num_sequence=2),
        window=True,
        prefix_cache=True,
    )
    assert small.scheduler.pool.total_pages * PAGE < len(prompt) + 150
    got = _serve(small, [("long", prompt, params)])
    again = _serve(small, [("again", prompt, params)])
    big = _serve(
        _core(_runner(lib_cache_dir), window=False, prefix_cache=False), [("long", prompt, params)]
    )
    assert got["tokens"]["long"][0] == big["tokens"]["long"][0]
    assert len(got["tokens"]["long"][0]) == 150
    assert again["tokens"]["again"][0] == got["tokens"]["long"][0]
    assert small.scheduler.prefix_cache is not None
    assert small.scheduler.prefix_cache.num_hit_tokens_total == 0
    two = _serve(small, [("two", prompt, {**params, "n": 2})])
    assert all(len(t) < 150 for t in two["tokens"].get("two", {0: []}).values())


def test_speculative_drafts_stop_at_the_window(lib_cache_dir, reference) -> None:
    """Drafts (always the same token, so mostly rejected: appended, then popped) while the
    sequence is short of the window, none once it slides (the cache cannot pop a slid
    sequence); the tokens are the plain engine's and the mirror follows the cache each step."""
    from mlctrio.runtime.speculative import Speculator

    class Fives:
        def propose(self, branches: list, want: list[int]) -> list[list[int]]:
            return [[5] * k for k in want]

    prompt = reference["prompts"][1][:3]
    params = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 4 * WINDOW}
    spec = Speculator("ngram", Fives(), draft_length=4, max_batch=8)
    core = _core(_runner(lib_cache_dir), window=True, prefix_cache=False, speculator=spec)
    drafted = _serve(core, [("r", prompt, params)])
    plain = _serve(
        _core(_runner(lib_cache_dir), window=False, prefix_cache=False), [("r", prompt, params)]
    )
    assert drafted["tokens"] == plain["tokens"]
    assert drafted["most"] <= MOST_PAGES
    assert spec.stats.num_draft_tokens > 0
