"""The served context window picks LongRoPE's factor set (runtime/model_loader.served_artifact;
docs/discussion/0010): a Phi-3 served within original_max_position_embeddings compiles the short
factors in, any other window keeps the model's config (and its compiled library)."""

from __future__ import annotations

from pathlib import Path

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
