"""Weight formats: safetensors (single, sharded, bf16), MLC tensor cache (checked against tvmjs'
own writer and loader), and HF:// resolution against a huggingface_hub cache built in tmp_path."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mlctrio.errors import ModelLoadError
from mlctrio.models.formats import (
    bf16_to_f32,
    f32_to_bf16,
    read_mlc_chat_config,
    read_mlc_params,
    read_safetensors,
    write_mlc_chat_config,
    write_mlc_params,
    write_safetensors,
    write_safetensors_sharded,
)
from mlctrio.models.hub import resolve_model_path


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5), dtype=np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "u32": rng.integers(0, 2**32, (4, 2), dtype=np.uint32),
        "i8": rng.integers(-128, 128, (9,), dtype=np.int8),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# -- safetensors -------------------------------------------------------------------------------


def test_safetensors_round_trip_and_library_compat(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    _assert_same(read_safetensors(tmp_path / "ours.safetensors"), tensors)
    with safe_open(tmp_path / "ours.safetensors", framework="numpy") as f:
        _assert_same({k: f.get_tensor(k) for k in f.keys()}, tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    _assert_same(read_safetensors(tmp_path / "theirs.safetensors"), tensors)


def test_safetensors_read_is_memory_mapped(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", _tensors())
    array = read_safetensors(tmp_path)["f32"]
    assert not array.flags.writeable and not array.flags.owndata  # a view of the map, no copy


def test_safetensors_bf16(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5, 3.14159, 1e-3], [65504.0, -0.0, 7.0, 1 / 3]], np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"w": values}, dtypes={"w": "BF16"})
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["w"]["dtype"] == "BF16" and header["w"]["data_offsets"] == [0, 16]
    loaded = read_safetensors(tmp_path / "m.safetensors")["w"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, bf16_to_f32(f32_to_bf16(values)))
    np.testing.assert_allclose(loaded, values, rtol=2**-8)
    bits = read_safetensors(tmp_path / "m.safetensors", keep_bf16_bits=True)["w"]
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, f32_to_bf16(values))


def test_bf16_conversion_matches_known_bits() -> None:
    values = np.array([1.0, -2.0, 1.00390625, 1.01171875, np.inf], np.float32)
    # 1.00390625 is halfway between bf16 1.0 and 1.0078125: ties round to even (1.0)
    np.testing.assert_array_equal(f32_to_bf16(values), [0x3F80, 0xC000, 0x3F80, 0x3F82, 0x7F80])


def test_safetensors_sharded_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tensors = {f"layer.{i}.weight": np.full((64,), i, np.float32) for i in range(30)}
    paths = write_safetensors_sharded(tmp_path, tensors, max_shard_bytes=1024)
    assert len(paths) == 8  # 4 tensors of 256 bytes per 1 KiB shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == 30 * 256
    with caplog.at_level(logging.INFO, logger="mlctrio.models.formats"):
        loaded = read_safetensors(tmp_path)
    _assert_same(loaded, tensors)
    assert "loading weights: 30/30 tensors" in caplog.text
    paths[3].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        read_safetensors(tmp_path)


def test_safetensors_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no safetensors"):
        read_safetensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelLoadError):
        read_safetensors(tmp_path)


# -- MLC tensor cache ------------------------------------------------------------------------------


def test_mlc_round_trip_preserves_bytes(tmp_path: Path) -> None:
    params = {**_tensors(), **{f"big.{i}": np.full((4096,), i, np.float32) for i in range(6)}}
    params["bf16"] = f32_to_bf16(np.linspace(-1, 1, 10, dtype=np.float32))
    params["huge"] = np.arange(40_000, dtype=np.float32)  # >= half a shard: a shard of its own
    write_mlc_params(tmp_path, params, bf16={"bf16": True}, shard_cap_bytes=64 * 1024)
    loaded, metadata = read_mlc_params(tmp_path, keep_bf16_bits=True)
    _assert_same(loaded, params)
    assert metadata == {
        "ParamSize": len(params),
        "ParamBytes": sum(a.nbytes for a in params.values()),
    }
    as_f32, _ = read_mlc_params(tmp_path)
    np.testing.assert_array_equal(as_f32["bf16"], bf16_to_f32(params["bf16"]))

    cache = json.loads((tmp_path / "tensor-cache.json").read_text())
    shards = cache["records"]
    assert len(shards) > 1
    for i, shard in enumerate(shards):
        data = (tmp_path / shard["dataPath"]).read_bytes()
        assert shard["dataPath"] == f"params_shard_{i}.bin" and shard["format"] == "raw-shard"
        assert shard["nbytes"] == len(data) and shard["md5sum"] == hashlib.md5(data).hexdigest()
        offset = 0
        for rec in shard["records"]:
            assert set(rec) == {"name", "shape", "dtype", "format", "nbytes", "byteOffset"}
            assert rec["byteOffset"] == offset
            offset += rec["nbytes"]
        assert offset == len(data)
    records = {r["name"]: (s, r) for s in shards for r in s["records"]}
    assert records["bf16"][1]["dtype"] == "bfloat16" and records["u32"][1]["dtype"] == "uint32"
    assert len(records["huge"][0]["records"]) == 1


def test_mlc_older_ndarray_cache_name_and_chat_config(tmp_path: Path) -> None:
    write_mlc_params(tmp_path, _tensors())
    cache = json.loads((tmp_path / "tensor-cache.json").read_text())
    for shard in cache["records"]:
        for rec in shard["records"]:
            rec["format"] = "raw-shape-dtype"  # any format but "f32-to-bf16" is raw bytes
    (tmp_path / "ndarray-cache.json").write_text(json.dumps(cache))
    (tmp_path / "tensor-cache.json").unlink()
    _assert_same(read_mlc_params(tmp_path)[0], _tensors())
    write_mlc_chat_config(tmp_path, {"model_type": "llama", "conv_template": "chatml"})
    assert read_mlc_chat_config(tmp_path)["conv_template"] == "chatml"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"tensor-cache\.json"):
        read_mlc_params(empty)
    with pytest.raises(ModelLoadError, match=r"mlc-chat-config\.json"):
        read_mlc_chat_config(empty)


def test_mlc_truncated_shard(tmp_path: Path) -> None:
    write_mlc_params(tmp_path, _tensors())
    shard = tmp_path / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ModelLoadError, match="bytes"):
        read_mlc_params(tmp_path)


# tvmjs.load_tensor_cache opens files without closing them
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_mlc_files_interoperate_with_tvmjs(tmp_path: Path) -> None:
    import tvm
    from tvm.contrib import tvmjs

    params = {k: v for k, v in _tensors().items() if v.size}  # tvm cannot copy empty arrays
    params["bf16"] = f32_to_bf16(np.array([0.5, -3.0, 100.0], np.float32))
    ours = tmp_path / "ours"
    write_mlc_params(ours, params, bf16={"bf16": True})
    loaded, _ = tvmjs.load_tensor_cache(str(ours), tvm.cpu())
    for name, array in params.items():
        assert loaded[name].numpy().tobytes() == array.tobytes(), name

    theirs = tmp_path / "theirs"
    f32 = {k: v for k, v in params.items() if k != "bf16"}
    tvmjs.dump_tensor_cache(f32, str(theirs), encode_format="f32-to-bf16", show_progress=False)
    back, _ = read_mlc_params(theirs)
    for name, array in f32.items():
        expected = bf16_to_f32(f32_to_bf16(array)) if array.dtype == np.float32 else array
        assert back[name].tobytes() == expected.tobytes(), name
    ours_bf16 = tmp_path / "ours_bf16"
    write_mlc_params(ours_bf16, f32, encode_format="f32-to-bf16")
    assert [p.read_bytes() for p in sorted(ours_bf16.glob("*.bin"))] == [
        p.read_bytes() for p in sorted(theirs.glob("*.bin"))
    ]


# -- resolve_model_path ----------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> Path:
    """A huggingface_hub cache holding org/tiny at COMMIT, laid out as the hub lays it out."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    blob = repo / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_text('{"model_type": "llama"}')
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_resolve_hf_from_cache(hf_cache: Path) -> None:
    path = resolve_model_path("HF://org/tiny")
    assert path == hf_cache / "models--org--tiny" / "snapshots" / COMMIT
    assert json.loads((path / "config.json").read_text()) == {"model_type": "llama"}
    assert resolve_model_path(f"hf://org/tiny@{COMMIT}") == path
    assert resolve_model_path("HF://org/tiny", cache_dir=hf_cache) == path


def test_resolve_hf_not_cached_names_cache_dir(hf_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache") as info:
        resolve_model_path("HF://org/absent")
    assert str(hf_cache) in str(info.value)
    with pytest.raises(ModelLoadError):
        resolve_model_path("HF://org/tiny@v2")


def test_resolve_local_paths(tmp_path: Path) -> None:
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
