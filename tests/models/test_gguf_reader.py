"""models/gguf_reader.py against the `gguf` package's reader (llama.cpp's own Python reader).

Both read the same files: every metadata value (as `ReaderField.contents()` gives it) and every
tensor (name, type, ne shape, the numpy view's shape, dtype and bytes) must be equal. The files
are the repository's small GGUFs (llama.cpp's converter wrote the family ones) and, in the slow
tier, the real SmolLM2 file. Broken files are a ValueError that says what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from mlctrio.models.gguf_reader import GGUFFile

DATA = Path(__file__).parent.parent / "data"
FILES = [
    DATA / "families" / "qwen3" / "gguf" / "model.gguf",
    DATA / "families" / "gemma3_text" / "gguf" / "model.gguf",
    DATA / "spm_tiny.gguf",
]


def _same_as_gguf_py(path: Path) -> None:
    ours = GGUFFile.open(path)
    theirs = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in theirs.fields.items()}
    assert ours.metadata == meta
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.parent.parent.name or p.name)
def test_reads_what_gguf_py_reads(path: Path) -> None:
    _same_as_gguf_py(path)


@pytest.mark.slow
def test_reads_the_real_smollm2_file_like_gguf_py(smollm2_gguf: Path) -> None:
    _same_as_gguf_py(smollm2_gguf)


def test_a_quantized_tensor_is_rows_by_bytes(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("w", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_array("nums", [1, 2, 3])
    writer.add_array("words", ["a", "bé", ""])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile.open(path)
    (t,) = f.tensors
    assert t.data.shape == (4, 2 * 34) and list(t.shape) == [64, 4]
    assert f.metadata["nums"] == [1, 2, 3] and f.metadata["words"] == ["a", "bé", ""]
    _same_as_gguf_py(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"GGML" + b[4:], "no GGUF magic"),
        (lambda b: b[:40], "truncated|runs past the end"),
        (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
    ],
)
def test_a_broken_file_says_what_is_wrong(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    good = FILES[0].read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(good))
    with pytest.raises(ValueError, match=message):
        GGUFFile.open(path)
