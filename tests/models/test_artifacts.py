"""HF checkpoints and MLC artifacts load through the same code and give the same model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.errors import ConfigError, ModelLoadError
from mlctrio.models import formats
from mlctrio.models.artifact import convert_weight, load_mlc_named, load_params, open_artifact
from mlctrio.models.compile import compile_model
from mlctrio.models.demo import write_demo_model
from mlctrio.models.weights import hf_to_mlc
from mlctrio.runtime.tvm_runner import TVMRunner
from mlctrio.sizing import ModelFootprint, resolve_engine_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "hf", preset="tiny")


def _logits(
    lib: Path, params: list[np.ndarray], art_config, prompts: list[list[int]]
) -> np.ndarray:  # type: ignore[no-untyped-def]
    runner = TVMRunner(
        lib,
        params,
        art_config,
        max_num_sequence=4,
        max_total_seq_length=512,
        prefill_chunk_size=128,
    )
    for i in range(len(prompts)):
        runner.add_sequence(i)
    first = runner.step([(i, p) for i, p in enumerate(prompts)])
    second = runner.step([(i, [7]) for i in range(len(prompts))])
    runner.close()
    return np.concatenate([first, second])


@pytest.mark.slow  # compiles a model
@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_hf_and_mlc_give_identical_logits(hf_dir: Path, tmp_path: Path, quantization: str) -> None:
    mlc_dir = convert_weight(hf_dir, quantization, tmp_path / "mlc")
    hf = open_artifact(hf_dir, quantization)
    mlc = open_artifact(mlc_dir)
    assert mlc.format == "mlc" and mlc.quantization == quantization
    assert mlc.config == hf.config
    compiled = compile_model(hf.config, quantization)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
    from_hf = _logits(compiled.lib_path, load_params(hf, compiled.params), hf.config, prompts)
    from_mlc = _logits(compiled.lib_path, load_params(mlc, compiled.params), mlc.config, prompts)
    assert np.array_equal(from_hf, from_mlc)
    assert np.isfinite(from_hf).all() and from_hf.std() > 0


def test_convert_weight_round_trip_preserves_every_tensor(hf_dir: Path, tmp_path: Path) -> None:
    mlc_dir = convert_weight(hf_dir, "q4f16_1", tmp_path / "mlc")
    expected = hf_to_mlc(open_artifact(hf_dir).config, formats.read_safetensors(hf_dir), "q4f16_1")
    got = load_mlc_named(open_artifact(mlc_dir))
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name
    chat = json.loads((mlc_dir / "mlc-chat-config.json").read_text())
    assert chat["quantization"] == "q4f16_1"
    assert (mlc_dir / "tokenizer.json").exists()


def test_artifact_errors(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither"):
        open_artifact(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        open_artifact(hf_dir, "q3f9")
    mlc_dir = convert_weight(hf_dir, "q0f32", tmp_path / "mlc")
    with pytest.raises(ModelLoadError, match="convert-weight"):
        open_artifact(mlc_dir, "q4f32_1")


@pytest.mark.slow  # compiles a model
def test_second_load_hits_the_compile_cache(hf_dir: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    config = open_artifact(hf_dir).config
    with caplog.at_level(logging.INFO, logger="mlctrio.models.compile"):
        first = compile_model(config, "q0f32", cache_dir=tmp_path)
        second = compile_model(config, "q0f32", cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert second.lib_path == first.lib_path
    assert any("compile cache hit" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # compiles a model (mlctrio compile)
def test_cli_model_commands(hf_dir: Path, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mlctrio", *args], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    out = run("convert-weight", str(hf_dir), "--quantization", "q0f32", "-o", str(tmp_path / "m"))
    assert Path(out, "tensor-cache.json").exists()
    config = run(
        "gen-config",
        str(hf_dir),
        "--quantization",
        "q4f32_1",
        "--conv-template",
        "chatml",
        "-o",
        str(tmp_path / "g"),
    )
    assert json.loads(Path(config).read_text())["conv_template"] == "chatml"
    lib = run("compile", str(tmp_path / "m"), "-o", str(tmp_path / "lib" / "m.so"))
    assert Path(lib).stat().st_size > 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlctrio",
            "convert-weight",
            str(tmp_path / "nope"),
            "--quantization",
            "q0f32",
            "-o",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


FOOTPRINT = ModelFootprint(
    context_window_size=4096,
    weight_bytes=1 << 30,
    kv_bytes_per_token=1 << 16,
    hidden_size=1024,
    intermediate_size=4096,
    vocab_size=32000,
)


def _resolve(mode: str, overrides: str = "", available: int = 16 << 30):  # type: ignore[no-untyped-def]
    config = ServerConfig(model="m", mode=mode, overrides=EngineOverrides.parse(overrides))  # type: ignore[arg-type]
    return resolve_engine_config(config, FOOTPRINT, available_bytes=lambda: available)


def test_modes_and_overrides() -> None:
    interactive, _ = _resolve("interactive")
    local, _ = _resolve("local")
    server, estimate = _resolve("server")
    assert interactive.max_num_sequence == 1 and interactive.max_total_seq_length == 4096
    assert local.max_num_sequence == 4 and local.max_total_seq_length == 4096
    assert server.max_num_sequence == 128 and server.max_total_seq_length > 4096 * 16
    assert estimate.total_bytes <= estimate.budget_bytes
    tuned, _ = _resolve("server", "max_num_sequence=8;max_total_seq_length=20000")
    assert tuned.max_num_sequence == 8 and tuned.max_total_seq_length == 20000
    assert server.max_prefill_tokens_while_decoding == 256  # the default
    smooth, _ = _resolve("server", "max_prefill_tokens_while_decoding=64")
    assert smooth.max_prefill_tokens_while_decoding == 64


def test_impossible_settings_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        _resolve("local", available=1 << 30)
    with pytest.raises(ConfigError, match="smaller than the context window"):
        _resolve("local", "max_total_seq_length=100")
    with pytest.raises(ConfigError, match="exceeds the model"):
        _resolve("local", "context_window_size=100000")


@pytest.mark.slow  # compiles a model
def test_cuda_library_compiles_from_the_same_definition(tmp_path: Path) -> None:
    """No GPU here: compile (nvcc/NVRTC through TVM) and check the library's entry points.
    Running it is tested only where a GPU exists."""
    from mlctrio.models.llama_config import TINY

    compiled = compile_model(TINY, "q4f16_1", target="cuda", cache_dir=tmp_path)
    data = compiled.lib_path.read_bytes()
    for name in (
        b"embed",
        b"batch_prefill",
        b"batch_decode",
        b"batch_verify",
        b"create_paged_kv_cache",
    ):
        assert name in data, name
    assert compiled.lib_path != compile_model(TINY, "q4f16_1", cache_dir=tmp_path).lib_path


def test_overrides_are_honoured_or_refused() -> None:
    capped, _ = _resolve(
        "local", "max_single_sequence_length=1000;prefix_cache_max_num_recycling_seqs=3"
    )
    assert capped.context_window_size == 1000
    assert capped.prefix_cache_max_num_recycling_seqs == 3
    neutral, _ = _resolve("local", "tensor_parallel_shards=1;sliding_window_size=-1")
    assert neutral.context_window_size == 4096
    for text in (
        "tensor_parallel_shards=2",
        "pipeline_parallel_stages=2",
        "max_history_size=2",
    ):
        with pytest.raises(ConfigError, match="not supported"):
            _resolve("local", text)
