"""Medusa and EAGLE drafting through the whole loader and engine on demo://tiny (random weights,
random heads with their own LM-head rows): greedy and seeded outputs are exactly the plain
engine's, drafts are really verified and some accepted, the compiled `*_hidden` functions give
the plain functions' logits and the hidden states `runner.hidden` gives, and the KV page
mirror matches the cache after every step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from mlctrio.config import EngineOverrides, ModelSpec, ServerConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.errors import ConfigError, ModelLoadError
from mlctrio.models.demo import PRESETS, demo_weights
from mlctrio.runtime.core import EngineCore
from mlctrio.runtime.model_loader import load_model
from mlctrio.runtime.spec_heads import write_heads

pytestmark = pytest.mark.slow
TINY = PRESETS["tiny"]
H, VOCAB = TINY.hidden_size, TINY.vocab_size
PROMPTS = [tuple(range(5, 5 + n)) for n in (3, 11, 30)]


def _heads(path: Path, kind: str) -> Path:
    """Heads that guess "the pending token again" (a Medusa block of zeros; an EAGLE layer
    passing the feature through with its attention and MLP outputs near zero) over the demo's
    own LM head: right wherever the demo repeats a token, else wrong (random-weight models do
    both), so drafts are accepted and rejected."""
    rng = np.random.default_rng(0)
    target = {"name": "demo tiny", "hidden_size": H, "vocab_size": VOCAB,
              "num_hidden_layers": TINY.num_layers}  # fmt: skip
    vocab = np.arange(VOCAB, dtype=np.int32)
    tensors: dict[str, np.ndarray] = {
        "draft_vocab": vocab,
        "lm_head.weight": demo_weights(TINY, 0)["lm_head.weight"].astype(np.float32),
    }
    config: dict[str, object] = {"kind": kind, "target": target}
    if kind == "medusa":
        for i in range(3):
            tensors[f"medusa_head.{i}.0.linear.weight"] = rng.normal(size=(H, H)) * 1e-3
            tensors[f"medusa_head.{i}.0.linear.bias"] = np.zeros(H)
    else:
        shape = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "intermediate_size": 96}  # fmt: skip
        config.update(shape)
        a, m = "layers.0.self_attn.", "layers.0.mlp."
        for name, size in [
            ("fc.weight", (H, 2 * H)),
            (a + "q_proj.weight", (64, H)),
            (a + "k_proj.weight", (32, H)),
            (a + "v_proj.weight", (32, H)),
            (a + "o_proj.weight", (H, 64)),
            (m + "gate_proj.weight", (96, H)),
            (m + "up_proj.weight", (96, H)),
            (m + "down_proj.weight", (H, 96)),
        ]:
            tensors[name] = rng.normal(size=size) / np.sqrt(size[-1])
        tensors["fc.weight"] = np.concatenate([tensors["fc.weight"][:, :H] * 1e-3, np.eye(H)], 1)
        tensors[a + "o_proj.weight"] *= 1e-3
        tensors[m + "down_proj.weight"] *= 1e-3
        tensors["fc.bias"] = np.zeros(H)
        tensors["layers.0.post_attention_layernorm.weight"] = np.ones(H)
    write_heads(path / kind, config, tensors)
    return path / kind


def _run(core: EngineCore, params: SamplingParams) -> list[tuple[int, ...]]:
    outs: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        core.add_request(GenerationRequest(f"r{i}", prompt, params, time.monotonic()))
        outs[f"r{i}"] = []
    while core.has_work():
        for out in core.step():
            for d in out.deltas:
                outs[out.request_id].extend(d.token_ids)
        assert core.scheduler.pool.num_free == core.runner.free_pages()
    return [tuple(outs[f"r{i}"]) for i in range(len(PROMPTS))]


SAMPLINGS = [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True),
]


@pytest.fixture(scope="module")
def plain() -> list[list[tuple[int, ...]]]:
    core, _ = load_model(ServerConfig(model="demo://tiny"))
    try:
        return [_run(core, p) for p in SAMPLINGS]
    finally:
        core.close()


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_drafting_with_heads_gives_the_plain_output(
    plain: list[list[tuple[int, ...]]], kind: str, tmp_path: Path
) -> None:
    config = ServerConfig(
        model="demo://tiny",
        speculative_mode=kind,
        draft_model=ModelSpec(str(_heads(tmp_path, kind))),
        overrides=EngineOverrides(spec_draft_length=3),
    )
    core, _ = load_model(config)
    try:
        for params, expected in zip(SAMPLINGS, plain, strict=True):
            assert _run(core, params) == expected
        stats = core.stats()
        assert stats.spec_num_drafts_total > 0
        assert 0 < stats.spec_num_accepted_tokens_total < stats.spec_num_draft_tokens_total
    finally:
        core.close()


def test_hidden_outputs_match_the_plain_functions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        model="demo://tiny",
        speculative_mode="medusa",
        draft_model=ModelSpec(str(_heads(tmp_path, "medusa"))),
    )
    caplog.set_level(logging.INFO, logger="mlctrio")
    core, _ = load_model(config)
    tapped_log = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ")]
    caplog.clear()
    plain, _ = load_model(ServerConfig(model="demo://tiny"))
    plain_log = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ")]
    try:
        # the model line says which library is served: medusa's carries the hidden states
        assert len(tapped_log) == 1 and "with hidden-state outputs" in tapped_log[0]
        assert len(plain_log) == 1 and "hidden-state" not in plain_log[0]
        tapped, ref = core.runner, plain.runner
        assert tapped.hidden_tap is not None
        for r in (tapped, ref):
            r.add_sequence(0)
            r.add_sequence(1)
        batch = [(0, list(range(3, 12))), (1, [7, 8])]
        np.testing.assert_allclose(tapped.step(batch), ref.step(batch), rtol=1e-5, atol=1e-5)
        batch = [(0, [20]), (1, [21])]  # decode
        np.testing.assert_allclose(tapped.step(batch), ref.step(batch), rtol=1e-5, atol=1e-5)
        for r in (tapped, ref):
            r.add_sequence(2)
        expected = ref.hidden([(2, [*range(3, 12), 20])])
        got = tapped.hidden_tap.rows(0, 0, 10)
        assert got is not None
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    finally:
        core.close()
        plain.close()


def test_heads_for_another_model_are_refused(tmp_path: Path) -> None:
    heads = _heads(tmp_path, "medusa")
    config = ServerConfig(
        model="demo://small", speculative_mode="medusa", draft_model=ModelSpec(str(heads))
    )
    with pytest.raises(ConfigError, match="trained for demo tiny"):
        load_model(config)
    with pytest.raises(ConfigError, match="ships no medusa heads"):
        load_model(ServerConfig(model="demo://tiny", speculative_mode="medusa"))


def test_scoring_every_token_as_decode_rows_gives_the_prefill_logits() -> None:
    """`score` of a step whose every token needs logits runs the decode function, one row per
    token (runner.rows_form_max): the logits are the prefill path's, each entry still attending
    causally over its own new tokens."""
    core, _ = load_model(ServerConfig(model="demo://tiny"))
    try:
        runner = core.runner
        got = {}
        for form in (True, False):
            runner.rows_form_max = 8 if form else 0
            for sid in (0, 1, 2):
                runner.add_sequence(sid)
            runner.step([(0, list(range(3, 20))), (1, [9, 8, 7]), (2, [4])])
            got[form] = runner.score([(0, [30, 31, 32, 33]), (1, [40]), (2, [50, 51])], [4, 1, 2])
            for sid in (0, 1, 2):
                runner.remove_sequence(sid)
        assert got[True].shape == (7, runner.vocab_size)
        np.testing.assert_allclose(got[True], got[False], rtol=1e-4, atol=1e-4)
    finally:
        core.close()


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_forks_and_prefix_hits_keep_the_output(kind: str, tmp_path: Path) -> None:
    """n > 1 (forked sequences: the tap copies the parent's hidden states) and a prompt repeated
    after its first run (a prefix-cache hit: those positions' hidden states were never
    computed): the drafting engine gives the plain engine's tokens, and its page mirror matches
    the cache after every step."""
    heads = _heads(tmp_path, kind)
    small = EngineOverrides(spec_draft_length=3)
    params = [
        SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),  # the prompt again
    ]
    prompt = PROMPTS[2]

    def run(core: EngineCore) -> list[list[int]]:
        got: list[list[int]] = []
        for i, p in enumerate(params):
            core.add_request(GenerationRequest(f"q{i}", prompt, p, time.monotonic()))
            tokens: dict[int, list[int]] = {}
            while core.has_work():
                for out in core.step():
                    for d in out.deltas:
                        tokens.setdefault(d.index, []).extend(d.token_ids)
                assert core.scheduler.pool.num_free == core.runner.free_pages()
            got += [tokens[k] for k in sorted(tokens)]
        return got

    plain, _ = load_model(ServerConfig(model="demo://tiny", overrides=small))
    core, _ = load_model(
        ServerConfig(
            model="demo://tiny", speculative_mode=kind, draft_model=ModelSpec(str(heads)),
            overrides=small,
        )
    )  # fmt: skip
    try:
        expected = run(plain)
        assert run(core) == expected
        stats = core.stats()  # (acceptance is checked above: here every draft may be wrong)
        assert stats.spec_num_drafts_total > 0
        assert stats.num_prefix_cache_hit_tokens_total > 0
    finally:
        core.close()
        plain.close()


def test_compile_builds_the_library_that_serve_loads_for_heads(tmp_path: Path) -> None:
    """`mlctrio compile --speculative-mode eagle` builds the hidden-output library, which
    `serve --model-lib` then accepts for eagle (and refuses for plain serving: its config
    differs)."""
    import subprocess
    import sys

    lib = tmp_path / "eagle.so"
    subprocess.run(
        [sys.executable, "-m", "mlctrio", "compile", "demo://tiny", "--speculative-mode", "eagle",
         "-o", str(lib)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    heads = ModelSpec(str(_heads(tmp_path, "eagle")))
    config = ServerConfig(
        model="demo://tiny", model_lib=str(lib), speculative_mode="eagle", draft_model=heads
    )
    core, _ = load_model(config)
    try:
        assert core.runner.hidden_tap is not None
    finally:
        core.close()
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(ServerConfig(model="demo://tiny", model_lib=str(lib)))
