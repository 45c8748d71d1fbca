"""The compile-cache key is derived from the sources that shape the compiled code."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tvm.target import Target

from mlctrio.models import build_info
from mlctrio.models.llama_config import TINY

TARGET = Target("llvm")


@pytest.fixture
def models_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of mlctrio/models that the digest reads instead (caches cleared around it)."""
    copy = tmp_path / "models"
    shutil.copytree(Path(build_info.__file__).parent, copy, ignore=shutil.ignore_patterns("__py*"))
    monkeypatch.setattr(build_info, "_MODELS", copy)
    _clear()
    yield copy
    monkeypatch.undo()
    _clear()


def _clear() -> None:
    build_info.codegen_sources.cache_clear()
    build_info.source_digest.cache_clear()


def test_the_sources_are_what_compile_py_imports() -> None:
    names = {p.name for p in build_info.codegen_sources()}
    kernels = {"llama.py", "te_ops.py", "int8_cpu.py", "attention_cpu.py", "rope_cpu.py"}
    assert {"compile.py", "schedules.py", "fastmath.py", "quantization.py", *kernels} <= names
    assert not names & {"demo.py", "fetch.py", "hub.py", "artifact.py", "gguf_file.py"}


def test_key_follows_a_change_in_any_source(models_copy: Path) -> None:
    key = build_info.cache_key(TINY, "q0f32", TARGET)
    _clear()
    assert build_info.cache_key(TINY, "q0f32", TARGET) == key  # same bytes, same key
    schedules = models_copy / "schedules.py"
    schedules.write_text(schedules.read_text() + "\n# a schedule change\n")
    _clear()
    changed = build_info.cache_key(TINY, "q0f32", TARGET)
    assert changed != key
    assert build_info.cache_key(TINY, "q4f32_1", TARGET) != changed


def test_a_new_kernel_module_counts_once_imported(models_copy: Path) -> None:
    (models_copy / "new_kernel.py").write_text("X = 1\n")
    assert "new_kernel.py" not in {p.name for p in build_info.codegen_sources()}
    before = build_info.source_digest()
    llama = models_copy / "llama.py"
    llama.write_text(
        llama.read_text().replace(
            "from typing import Any\n", "from typing import Any\nfrom . import new_kernel\n", 1
        )
    )
    _clear()
    assert "new_kernel.py" in {p.name for p in build_info.codegen_sources()}
    imported = build_info.source_digest()
    (models_copy / "new_kernel.py").write_text("X = 2\n")
    _clear()
    assert build_info.source_digest() not in (before, imported)
