"""Issue 16 item 8 (one part): a `--model-lib` built for another model or quantization is refused
at load with one line naming both, before any weights load; it never reports ready.

Fast tests compile libraries that hold only the build info (under a second); the slow one gives
a real `demo://tiny` library (copied alone, no metadata beside it, as `mlctrio compile -o` does)
to the right model and to wrong ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tvm
from tvm import relax

from mlctrio.config import ServerConfig
from mlctrio.errors import ModelLoadError
from mlctrio.models.artifact import open_artifact
from mlctrio.models.build_info import attach_build_info, build_info, build_mismatch, cache_key
from mlctrio.models.demo import ensure_demo_model
from mlctrio.models.llama_config import TINY
from mlctrio.models.target import host_cpu_target
from mlctrio.runtime import model_loader


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MLCTRIO_CACHE_DIR", str(root))
    return root


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check must come before the weights are read."""

    def refuse(*args: object) -> None:
        raise AssertionError("weights loaded before the library was checked")

    monkeypatch.setattr(model_loader, "load_params", refuse)


def _info_library(path: Path, info: dict[str, Any] | None) -> Path:
    """A Relax library holding only the build info function (or, with None, a dummy one)."""
    bb = relax.BlockBuilder()
    with bb.function("something_else", []):
        bb.emit_func_output(tvm.ir.StringImm("x"))
    mod = bb.get()
    if info is not None:
        mod = attach_build_info(mod, info)
    tvm.compile(mod, target="llvm").export_library(str(path))
    return path


def _tiny_info(quantization: str = "q0f32", **config_changes: Any) -> dict[str, Any]:
    art = open_artifact(ensure_demo_model("tiny"))
    config = art.config
    if config_changes:
        import attrs

        config = attrs.evolve(config, **config_changes)
    target = host_cpu_target()
    return build_info(config, quantization, target, cache_key(config, quantization, target))


def test_build_mismatch_names_both_sides() -> None:
    target = host_cpu_target()
    info = build_info(TINY, "q4f32_1", target, "k")
    assert build_mismatch(info, TINY, "q4f32_1") is None
    quant = build_mismatch(info, TINY, "q0f32")
    assert quant is not None and "quantization q4f32_1 vs q0f32" in quant
    other = TINY.__class__(**{**TINY.to_dict(), "vocab_size": TINY.vocab_size + 8})
    vocab = build_mismatch(info, other, "q4f32_1")
    assert vocab is not None
    assert f"vocab_size {TINY.vocab_size} vs {TINY.vocab_size + 8}" in vocab
    assert f"vocab {TINY.vocab_size}," in vocab and f"vocab {TINY.vocab_size + 8}," in vocab
    assert build_mismatch({}, TINY, "q0f32") == "its build info names no config and quantization"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"quantization": "q4f32_1"}, "quantization q4f32_1 vs q0f32"),
        ({"num_hidden_layers": 3}, "num_hidden_layers 3 vs 2"),
        ({"vocab_size": 1024}, "vocab_size 1024 vs 1000"),
    ],
)
def test_model_lib_for_another_model_is_refused_at_load(
    cache: Path, tmp_path: Path, no_weights: None, changes: dict[str, Any], expected: str
) -> None:
    lib = _info_library(tmp_path / "other.so", _tiny_info(**changes))
    config = ServerConfig(model="demo://tiny", model_lib=str(lib))
    with pytest.raises(ModelLoadError) as err:
        model_loader.load_model(config)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--model-lib {lib} does not match the model demo://tiny")
    assert expected in message


def test_model_lib_without_build_info_is_refused(
    cache: Path, tmp_path: Path, no_weights: None
) -> None:
    lib = _info_library(tmp_path / "old.so", None)
    with pytest.raises(ModelLoadError, match="carries no build info"):
        model_loader.load_model(ServerConfig(model="demo://tiny", model_lib=str(lib)))


def test_model_lib_that_fails_its_record_is_refused_before_dlopen(
    cache: Path, tmp_path: Path, no_weights: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = _info_library(tmp_path / "entry.so", _tiny_info())
    lib.with_suffix(".json").write_text(json.dumps({"size": 1, "sha256": "0" * 64}))

    def refuse(path: object) -> None:
        raise AssertionError("dlopen-ed a library that fails its record")

    monkeypatch.setattr("mlctrio.runtime.tvm_library.load_library", refuse)
    corrupt = r"is corrupt: entry\.so is \d+ bytes, its record says 1$"
    with pytest.raises(ModelLoadError, match=corrupt):
        model_loader.load_model(ServerConfig(model="demo://tiny", model_lib=str(lib)))


@pytest.mark.slow
def test_real_model_lib_serves_its_model_and_refuses_others(cache: Path, tmp_path: Path) -> None:
    from mlctrio.models.compile import compile_model

    art = open_artifact(ensure_demo_model("tiny"))
    compiled = compile_model(art.config, art.quantization)
    lib = tmp_path / "tiny.so"
    shutil.copyfile(compiled.lib_path, lib)  # alone, as `mlctrio compile -o` writes it

    core, info = model_loader.load_model(
        ServerConfig(model="demo://tiny", model_lib=str(lib), mode="interactive")
    )
    core.runner.add_sequence(0)
    logits = core.runner.step([(0, [1, 2, 3])])
    core.close()
    assert info.config["source"] == "--model-lib" and logits.std() > 0

    with pytest.raises(ModelLoadError, match="quantization q0f32 vs q4f32_1"):
        model_loader.load_model(
            ServerConfig(model="demo://tiny", model_lib=str(lib), quantization="q4f32_1")
        )
    other = tmp_path / "other"
    shutil.copytree(ensure_demo_model("tiny"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="num_hidden_layers 2 vs 3"):
        model_loader.load_model(ServerConfig(model=str(other), model_lib=str(lib)))
