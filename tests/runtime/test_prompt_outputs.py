"""EngineCore over the echo fake: prompt logprobs and embeddings (runtime/prompt_outputs.py,
runtime/forward.py), beside ordinary requests in the same steps."""

from __future__ import annotations

import numpy as np
import pytest

from mlctrio.engine.types import GenerationRequest, RequestOutput, SamplingParams
from mlctrio.testing.echo import HIDDEN_SIZE, build_echo_core
from tests.runtime.test_core import drain, final, texts

_EMBED = SamplingParams(max_tokens=1)


def _fake_embedding(ids: list[int], pooling: str) -> np.ndarray:
    """What the echo fake's `hidden` pools to, computed the obvious way."""
    feats = np.cos(np.outer(np.asarray(ids, np.float64), np.arange(1, HIDDEN_SIZE + 1)))
    picked = {"mean": feats.mean(axis=0), "cls": feats[0], "last": feats[-1]}[pooling]
    return picked.astype(np.float32)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
@pytest.mark.parametrize("chunk", [7, 512])
def test_embedding_pools_every_chunk_and_frees_its_pages(pooling: str, chunk: int) -> None:
    core, tok, _ = build_echo_core(prefill_chunk_size=chunk, prefix_cache_mode="radix")
    text = "an embedding of a prompt longer than one chunk"
    ids = tok.encode(text)
    core.add_request(GenerationRequest("e", tuple(ids), _EMBED, pooling=pooling))  # type: ignore[arg-type]
    core.add_request(GenerationRequest("g", tuple(tok.encode("hello")), SamplingParams()))
    steps = drain(core)
    record = final(steps, "e")
    assert record.embedding is not None and record.error is None
    np.testing.assert_allclose(record.embedding, _fake_embedding(ids, pooling), atol=1e-6)
    assert [d.finish_reason for d in record.deltas] == ["stop"]
    assert record.usage.prompt_tokens == len(ids) and record.usage.completion_tokens == 0
    assert texts(steps, "g") == {0: "hello"}  # the generation beside it is untouched
    # Nothing of the embedding stays in the cache: only the generation's prompt is cached.
    runner = core.runner
    assert [runner.tokens_of(s) for s in runner.sequence_ids()] == [  # type: ignore[attr-defined]
        tuple(tok.encode("hello")) + tuple(tok.encode("hello"))
    ]


def test_embedding_never_starts_from_a_cached_prefix() -> None:
    core, tok, _ = build_echo_core(prefix_cache_mode="radix")
    ids = tuple(tok.encode("a shared prefix, then more"))
    core.add_request(GenerationRequest("warm", ids, SamplingParams(max_tokens=2)))
    drain(core)
    core.add_request(GenerationRequest("e", ids, _EMBED, pooling="mean"))
    record = final(drain(core), "e")
    assert record.usage.cached_tokens == 0
    np.testing.assert_allclose(record.embedding, _fake_embedding(list(ids), "mean"), atol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [5, 512])
def test_prompt_logprobs_cover_every_prompt_token_once(chunk: int) -> None:
    core, tok, _ = build_echo_core(prefill_chunk_size=chunk)
    ids = tok.encode("prompt logprobs!")
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=True)
    core.add_request(GenerationRequest("p", tuple(ids), params))
    core.add_request(GenerationRequest("plain", tuple(tok.encode("xyz")), SamplingParams()))
    steps = drain(core)
    with_prompt = [r for s in steps for r in s if r.request_id == "p" and r.prompt_logprobs]
    assert len(with_prompt) == 1  # delivered once, with the first token
    record: RequestOutput = with_prompt[0]
    assert record.deltas and record.deltas[0].token_ids  # the first sampled token rides along
    plp = record.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    eos = tok.eos_token_ids[0]
    for pos, entry in enumerate(plp[1:], start=1):
        assert entry is not None and entry.token_id == ids[pos]
        # Inside the prompt the fake predicts EOS with all the mass (its logit 0 vs -1e3, -1e4):
        assert entry.top_logprobs[0].token_id == eos
        assert entry.top_logprobs[0].logprob == pytest.approx(0.0, abs=1e-3)
        assert len(entry.top_logprobs) == 2
        assert entry.logprob < -900 and entry.token == tok.decode([ids[pos]])
    assert texts(steps, "p") == {0: "pro"} and texts(steps, "plain") == {0: "xyz"}
    assert not any(r.prompt_logprobs for s in steps for r in s if r.request_id == "plain")
