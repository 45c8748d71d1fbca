"""A fast GGUF reader: the file's metadata as Python values and its tensors as memory-mapped views.

Why not `gguf.GGUFReader`: it builds numpy views for every element of every array field, one or
two per string, so Gemma 3's 262,144-token vocabulary (three such arrays) takes 7-14 s to open
here, before anything is loaded. This reader parses the same format (GGUF v2/v3, little endian:
header, key/value pairs, tensor infos, aligned data; llama.cpp's gguf.cpp) in one pass over a
memory map, decoding strings and arrays straight into Python values: well under a second.

What it returns mirrors what gguf_file.py used from gguf-py, so both agree (tested):
- `metadata`: {key: value} as `ReaderField.contents()` gives it (int/float/bool/str, lists for
  arrays), plus gguf-py's synthetic "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count";
- `tensors`: name, `tensor_type` (gguf's GGMLQuantizationType), `shape` (ggml's ne order,
  elements per row first) and `data`: a read-only view shaped as gguf-py shapes it (rows x
  elements for float types, rows x bytes for block-quantized ones).

Malformed files raise ValueError with what was wrong and where.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> (struct code, size) of the scalar types; 8 = string, 9 = array.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
            6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip


@attrs.frozen
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: npt.NDArray[np.uint64]  # ggml's ne: elements per row first
    data: npt.NDArray[Any]


@attrs.define
class _Cursor:
    buf: Any
    pos: int = 0

    def scalar(self, code: str, size: int) -> Any:
        if self.pos + size > len(self.buf):
            raise ValueError(f"truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q", 8)
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at byte {self.pos} runs past the end")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise ValueError(f"unknown value type {vtype} at byte {self.pos}")

    def array(self) -> list[Any]:
        etype, count = self.scalar("I", 4), self.scalar("Q", 8)
        if etype in _NUMPY:  # numbers: one frombuffer, not a loop
            size = _SCALARS[etype][1]
            if self.pos + size * count > len(self.buf):
                raise ValueError(f"an array of {count} items at byte {self.pos} runs past the end")
            items = np.frombuffer(self.buf, _NUMPY[etype], count, self.pos).tolist()
            self.pos += size * count
            return items
        return [self.value(etype) for _ in range(count)]


@attrs.define
class GGUFFile:
    """An open GGUF file: `metadata` and `tensors` (views into a read-only memory map)."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        import gguf

        path = Path(path)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(memoryview(mapped))
        if bytes(cur.buf[:4]) != MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.scalar("I", 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3; big-endian?)")
        n_tensors, n_kv = cur.scalar("Q", 8), cur.scalar("Q", 8)
        meta: dict[str, Any] = {
            "GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv,
        }  # fmt: skip
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("I", 4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("Q", 8) for _ in range(cur.scalar("I", 4))]
            infos.append((name, dims, cur.scalar("I", 4), cur.scalar("Q", 8)))
        align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cur.pos // align) * align
        raw = np.frombuffer(mapped, np.uint8)
        tensors = [_tensor(gguf, raw, start, *info) for info in infos]
        return cls(path, meta, tensors)


def _tensor(gguf: Any, raw: npt.NDArray[np.uint8], start: int, name: str, dims: list[int],
            type_id: int, offset: int) -> GGUFTensor:  # fmt: skip
    qtype = gguf.GGMLQuantizationType(type_id)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_elems = int(np.prod(dims)) if dims else 1
    n_bytes = n_elems * type_size // block
    begin = start + offset
    if begin + n_bytes > raw.size:
        raise ValueError(f"tensor {name} ({n_bytes} bytes at {begin}) runs past the end")
    np_dims = tuple(reversed(dims))
    data = raw[begin : begin + n_bytes]
    if qtype.name in _FLOAT_TYPES:
        data = data.view(_FLOAT_TYPES[qtype.name]).reshape(np_dims)
    else:
        data = data.reshape(gguf.quants.quant_shape_to_byte_shape(np_dims, qtype))
    return GGUFTensor(name, qtype, np.asarray(dims, np.uint64), data)
