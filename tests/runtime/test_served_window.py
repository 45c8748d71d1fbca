"""The served context window picks LongRoPE's factor set (runtime/model_loader.served_artifact;
docs/discussion/0010): a Phi-3 served within original_max_position_embeddings compiles the short
factors in, any other window keeps the model's config (and its compiled library)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.models.artifact import open_artifact
from mlctrio.runtime.model_loader import served_artifact

PHI3 = Path(__file__).parent.parent / "data" / "families" / "phi3"


def _served(**overrides: int):
    art = open_artifact(PHI3)
    config = ServerConfig(model=str(PHI3), overrides=EngineOverrides(**overrides))
    return art, served_artifact(art, config)


def test_the_models_window_keeps_the_long_factors() -> None:
    for overrides in ({}, {"context_window_size": 64}, {"context_window_size": 33}):
        art, served = _served(**overrides)
        assert served is art
        assert served.config.longrope_factors == art.config.rope_scaling["long_factor"]


def test_a_window_within_the_original_one_takes_the_short_factors() -> None:
    for overrides, window in (
        ({"context_window_size": 32}, 32),
        ({"max_single_sequence_length": 20}, 20),
        ({"context_window_size": 64, "max_single_sequence_length": 16}, 16),
    ):
        art, served = _served(**overrides)
        assert served.config.context_window_size == window
        assert served.config.longrope_factors == art.config.rope_scaling["short_factor"]
        assert served.path == art.path and served.quantization == art.quantization


MISTRAL = Path(__file__).parent.parent / "data" / "families" / "mistral"
GEMMA = Path(__file__).parent.parent / "data" / "families" / "gemma3_text"


def test_the_sliding_window_override_makes_every_layer_slide() -> None:
    """mlc_llm's sliding_window_size: a model trained without one gets every layer sliding,
    which is exactly the Mistral fixture's config (checked against transformers in
    tests/models/test_families.py) when its own window is removed first."""
    art = open_artifact(MISTRAL)
    bare = attrs.evolve(art, config=attrs.evolve(art.config, layer_types=None, sliding_window=None))
    config = ServerConfig(model=str(MISTRAL), overrides=EngineOverrides(sliding_window_size=16))
    assert served_artifact(bare, config).config == art.config
    neutral = ServerConfig(model=str(MISTRAL), overrides=EngineOverrides(sliding_window_size=-1))
    assert served_artifact(bare, neutral) is bare


def test_the_sliding_window_override_resizes_gemmas_sliding_layers_only() -> None:
    art = open_artifact(GEMMA)
    config = ServerConfig(model=str(GEMMA), overrides=EngineOverrides(sliding_window_size=8))
    served = served_artifact(art, config).config
    assert served.sliding_window == 8 and served.layer_types == art.config.layer_types


def test_attention_sinks_need_a_sliding_window_and_fit_in_it() -> None:
    """mlc_llm's attention_sink_size: compiled in beside the window (and in the cache's window,
    tests/runtime/test_kv_window.py); refused in one line where nothing slides or it does not
    fit below the window."""
    from mlctrio.errors import ConfigError

    art = open_artifact(MISTRAL)
    sinks = ServerConfig(model=str(MISTRAL), overrides=EngineOverrides(attention_sink_size=4))
    served = served_artifact(art, sinks).config
    assert served.attention_sink_size == 4 and served.kv_window == (16 + 4, 4)
    assert served_artifact(open_artifact(GEMMA), sinks).config.attention_sink_size == 4
    bare = attrs.evolve(art, config=attrs.evolve(art.config, layer_types=None, sliding_window=None))
    for artifact, overrides in ((bare, {}), (art, {"attention_sink_size": 16})):
        config = ServerConfig(
            model=str(MISTRAL), overrides=EngineOverrides(**{"attention_sink_size": 4, **overrides})
        )
        with pytest.raises(ConfigError, match="attention_sink_size"):
            served_artifact(artifact, config)
