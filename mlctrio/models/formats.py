"""Weight file formats as `name -> numpy array` dicts.

    HF safetensors   model.safetensors, or shards listed in model.safetensors.index.json;
                     read memory-mapped (zero copy; bf16 becomes float32, numpy has no bf16)
    MLC artifacts    mlc-chat-config.json + tensor-cache.json (older: ndarray-cache.json) +
                     params_shard_N.bin, in tvmjs' record layout: per shard {dataPath, format
                     "raw-shard", nbytes, md5sum, records}, per tensor {name, shape, dtype,
                     format, nbytes, byteOffset}; bfloat16 is stored as its uint16 bits

Where a model lives (the huggingface_hub cache, downloads): hub.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np

from mlctrio.errors import ModelLoadError
from mlctrio.progress import Progress

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
TENSOR_CACHE_NAMES = ("tensor-cache.json", "ndarray-cache.json")
MLC_CHAT_CONFIG = "mlc-chat-config.json"
SHARD_CAP_BYTES = 32 << 20

_ST_DTYPES: Mapping[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_ST_CODES: Mapping[str, str] = {v: k for k, v in _ST_DTYPES.items()}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32: exact, bf16 is the top half of an f32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16) exactly as tvmjs does: round to nearest even, but
    truncate values beyond bf16's largest finite value (attention masks), which clips them."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    limit = np.array([np.finfo(np.float32).max]).astype(np.float32).view(np.uint32) >> 16 << 16
    bf16_max = limit.view(np.float32)[0]
    inside = (values < bf16_max) & (values > -bf16_max)
    rounding = np.where(inside, ((bits >> 16) & 1) + np.uint32(0x7FFF), np.uint32(0))
    return ((bits + rounding) >> 16).astype(np.uint16)


class _Progress:
    """Weight loading/saving progress, "loading weights: i/n tensors" (progress.Progress: a bar
    on a terminal, about ten log lines otherwise; nothing for fewer than 20 tensors)."""

    def __init__(self, total: int, what: str = "loading weights") -> None:
        self.progress = Progress(what, total, noun="tensors", min_total=20, logger=logger)

    def step(self) -> None:
        self.progress.advance()


# -- safetensors ---------------------------------------------------------------------------------


@attrs.frozen
class _MappedSafetensors:
    path: Path
    buf: mmap.mmap
    header: dict[str, Any]
    base: int  # where the data starts

    @classmethod
    def open(cls, path: Path) -> _MappedSafetensors:
        try:
            with open(path, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # an empty file cannot be mapped
            raise ModelLoadError(f"cannot map {path}: {exc}") from exc
        header_len = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
        if not 0 <= header_len <= len(buf) - 8:
            raise ModelLoadError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(bytes(buf[8 : 8 + header_len]))
        except ValueError as exc:
            raise ModelLoadError(f"{path} has a corrupt safetensors header: {exc}") from exc
        header.pop("__metadata__", None)
        return cls(path, buf, header, 8 + header_len)

    def tensors(self, keep_bf16_bits: bool) -> Iterator[tuple[str, np.ndarray]]:
        # The arrays are views into the map and keep it alive: no bytes are copied.
        for name, info in self.header.items():
            try:
                code, shape = info["dtype"], tuple(info["shape"])
                begin, end = (self.base + o for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelLoadError(f"{self.path}: bad header entry for {name}") from exc
            if code == "BF16":
                dtype = np.dtype("<u2")
            elif code in _ST_DTYPES:
                dtype = np.dtype(_ST_DTYPES[code]).newbyteorder("<")
            else:
                raise ModelLoadError(f"{self.path}: tensor {name} has unsupported dtype {code}")
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or end > len(self.buf):
                raise ModelLoadError(f"{self.path}: tensor {name} has the wrong byte range")
            array = np.frombuffer(self.buf, dtype, count, begin).reshape(shape)
            if code == "BF16" and not keep_bf16_bits:
                array = bf16_to_f32(array)
            yield name, array


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, or model.safetensors, or all."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))


def read_safetensors(path: str | Path, *, keep_bf16_bits: bool = False) -> dict[str, np.ndarray]:
    """Read a safetensors file or checkpoint directory, memory-mapped and read-only.

    bf16 tensors become float32 (a copy), or stay uint16 bits with keep_bf16_bits=True.
    """
    path = Path(path)
    files = safetensors_files(path) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ModelLoadError(f"no safetensors weights in {path}")
    mapped = [_MappedSafetensors.open(f) for f in files]
    progress = _Progress(sum(len(m.header) for m in mapped))
    out: dict[str, np.ndarray] = {}
    for m in mapped:
        for name, array in m.tensors(keep_bf16_bits):
            if name in out:
                raise ModelLoadError(f"tensor {name} appears in more than one shard of {path}")
            out[name] = array
            progress.step()
    return out


def _safetensors_blob(
    tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str], metadata: Mapping[str, str]
) -> tuple[bytes, list[np.ndarray]]:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, array in tensors.items():
        code = dtypes.get(name) or _ST_CODES.get(np.dtype(array.dtype).name)
        if code == "BF16" and array.dtype != np.uint16:
            array = f32_to_bf16(np.asarray(array, np.float32))
        if code is None:
            raise ValueError(f"tensor {name}: dtype {array.dtype} has no safetensors code")
        data = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        arrays.append(data)
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw, arrays


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    *,
    dtypes: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one safetensors file. `dtypes` may name "BF16" for a tensor: float32 values are
    rounded to bf16, uint16 arrays are taken as bf16 bits."""
    head, arrays = _safetensors_blob(tensors, dtypes or {}, metadata or {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for array in arrays:
            if array.nbytes:
                f.write(array.reshape(-1).view(np.uint8).data)


def write_safetensors_sharded(
    model_dir: str | Path,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int = 2 << 30,
    dtypes: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write model-0000i-of-0000n.safetensors shards and model.safetensors.index.json."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if groups[-1] and size + array.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = array
        size += array.nbytes
    paths, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        path = model_dir / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(path, group, dtypes=dtypes)
        paths.append(path)
        weight_map.update(dict.fromkeys(group, path.name))
    total = sum(int(a.nbytes) for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


# -- MLC tensor cache ------------------------------------------------------------------------------


def _tensor_cache_json(model_dir: Path) -> Path:
    for name in TENSOR_CACHE_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ModelLoadError(f"{model_dir} has no {' or '.join(TENSOR_CACHE_NAMES)}")


def read_mlc_params(
    model_dir: str | Path, *, keep_bf16_bits: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read MLC params: (name -> array, the cache's metadata). Arrays are read-only views of
    the memory-mapped shards. bfloat16 (and float32 records stored "f32-to-bf16") become
    float32, unless keep_bf16_bits=True keeps bfloat16 as uint16 bits."""
    model_dir = Path(model_dir)
    cache_json = _tensor_cache_json(model_dir)
    try:
        cache = json.loads(cache_json.read_text(encoding="utf-8"))
        shards = cache["records"]
        progress = _Progress(sum(len(s["records"]) for s in shards))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            data_path = model_dir / shard["dataPath"]
            with open(data_path, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if shard["nbytes"] else b""
            if len(buf) != shard["nbytes"]:
                raise ModelLoadError(
                    f"{data_path} has {len(buf)} bytes, expected {shard['nbytes']}"
                )
            for rec in shard["records"]:
                out[rec["name"]] = _decode_record(rec, buf, keep_bf16_bits)
                progress.step()
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot read MLC params {cache_json}: {exc!r}") from exc
    return out, dict(cache.get("metadata") or {})


def _decode_record(rec: Mapping[str, Any], buf: Any, keep_bf16_bits: bool) -> np.ndarray:
    shape, dtype, offset = tuple(rec["shape"]), str(rec["dtype"]), int(rec["byteOffset"])
    count = math.prod(shape)
    if dtype == "bfloat16" or (dtype == "float32" and rec["format"] == "f32-to-bf16"):
        bits = np.frombuffer(buf, np.uint16, count, offset).reshape(shape)
        return bits if keep_bf16_bits and dtype == "bfloat16" else bf16_to_f32(bits)
    array = np.frombuffer(buf, np.dtype(dtype).newbyteorder("<"), count, offset).reshape(shape)
    if array.nbytes != rec["nbytes"]:
        raise ValueError(f"record {rec['name']}: {array.nbytes} bytes, header says {rec['nbytes']}")
    return array


def write_mlc_params(
    model_dir: str | Path,
    params: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, Any] | None = None,
    bf16: Mapping[str, bool] | None = None,
    encode_format: Literal["raw", "f32-to-bf16"] = "raw",
    shard_cap_bytes: int = SHARD_CAP_BYTES,
) -> Path:
    """Write params_shard_N.bin + tensor-cache.json with tvmjs' sharding rule (a shard closes
    before it would reach the cap; a tensor of half the cap or more gets a shard of its own).

    `bf16[name]` stores a tensor as dtype "bfloat16": uint16 arrays are taken as its bits,
    float32 values are rounded. `encode_format` is written on every record, as tvmjs does;
    with "f32-to-bf16", float32 tensors are stored as bf16 (MLC's convert_weight default).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], bytes]] = []
    pending_bytes = 0
    progress = _Progress(len(params), "saving weights")

    def commit(items: list[tuple[dict[str, Any], bytes]]) -> None:
        path = model_dir / f"params_shard_{len(shards)}.bin"
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "wb") as f:
            for _, data in items:
                f.write(data)
                md5.update(data)
        shards.append({
            "dataPath": path.name, "format": "raw-shard",
            "nbytes": sum(len(d) for _, d in items), "records": [r for r, _ in items],
            "md5sum": md5.hexdigest(),
        })  # fmt: skip

    for name, array in params.items():
        array = np.asarray(array)
        dtype = np.dtype(array.dtype).name
        if (bf16 or {}).get(name):
            bits = array if array.dtype == np.uint16 else f32_to_bf16(array)
            data, dtype = np.ascontiguousarray(bits, "<u2").tobytes(), "bfloat16"
        elif encode_format == "f32-to-bf16" and dtype == "float32":
            data = f32_to_bf16(array).tobytes()
        else:
            data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        rec = {"name": name, "shape": list(array.shape), "dtype": dtype,
               "format": encode_format, "nbytes": len(data)}  # fmt: skip
        if pending_bytes + len(data) >= shard_cap_bytes:
            if len(data) * 2 >= shard_cap_bytes:
                commit([({**rec, "byteOffset": 0}, data)])  # out of band, as tvmjs
                progress.step()
                continue
            commit(pending)
            pending, pending_bytes = [], 0
        pending.append(({**rec, "byteOffset": pending_bytes}, data))
        pending_bytes += len(data)
        progress.step()
    if pending:
        commit(pending)
    meta = dict(metadata or {})
    meta.setdefault("ParamSize", len(params))
    meta.setdefault("ParamBytes", sum(s["nbytes"] for s in shards))
    out = model_dir / TENSOR_CACHE_NAMES[0]
    out.write_text(json.dumps({"metadata": meta, "records": shards}, indent=4))
    return out


def read_mlc_chat_config(model_dir: str | Path) -> dict[str, Any]:
    """mlc-chat-config.json as a dict (ModelLoadError if missing or not JSON)."""
    return read_json_object(Path(model_dir) / MLC_CHAT_CONFIG)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (ModelLoadError if missing, not JSON, or not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def write_mlc_chat_config(model_dir: str | Path, config: Mapping[str, Any]) -> Path:
    path = Path(model_dir) / MLC_CHAT_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(config), indent=2) + "\n")
    return path
