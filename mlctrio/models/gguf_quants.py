"""GGUF tensor data -> mlctrio's stored weight arrays (quantization.QuantSpec), exactly where a
kernel exists, converted where none does.

| GGUF type | stored as | how |
|---|---|---|
| F32, F16, BF16 | q0f32, q0f16, q0bf16 | as they are (bf16 keeps its bits) |
| Q8_0 | q8_0 | block (f16 d, int8 q[32]) -> scale d, stored q + 128: bit-exact |
| Q4_0 | q4_0 | block (f16 d, 16 bytes) -> the 32 nibbles re-packed, scale d: bit-exact |
| Q4_1 | q4_1 | block (f16 d, f16 m, 16 bytes) -> nibbles re-packed, (d, m): bit-exact |
| Q5_0 | q8_0 | block (f16 d, 32 high bits, 16 bytes) -> q - 16 as int8, scale d: exact |
| Q4_K | q4_1 | nibbles kept; sub-block scale d * sc and min -dmin * m rounded to f16 |
| Q3_K, Q2_K, IQ4_* | q4_1 | dequantized, re-quantized per 32 with llama.cpp's Q4_1 |
| anything else (Q5_*, Q6_K, IQ*) | q8_0 | dequantized, re-quantized per 32 with llama.cpp's Q8_0 |

A GGUF block's nibbles are ordered low halves first (byte j holds elements j and j + 16);
ours put element k of a group at word k // 8, bits 4 * (k % 8). Every conversion here works row by
row, so rows can be permuted (Q/K un-permutation) and concatenated (fused qkv) before or after it.
Conversions that are not bit-exact are reported by `ConvertedTensor.lossless`, which the loader
logs with what they cost. Needs the `gguf` package (its `quants` module is the reference
implementation of every block format, used for dequantizing and re-quantizing).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.models.quantization import (
    QuantSpec,
    effective_weight_np,
    get_quantization,
    pack_words_np,
    quantize_weight_np,
)

QK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
NATIVE = {"F32": "q0f32", "F16": "q0f16", "BF16": "q0bf16", "Q8_0": "q8_0", "Q4_0": "q4_0",
          "Q4_1": "q4_1", "Q5_0": "q8_0"}  # fmt: skip
TO_Q4_1 = ("Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
# Width order when parts of a fused weight (q, k, v or gate, up) differ: the widest wins.
WIDTH = ("q0f32", "q0bf16", "q0f16", "q8_0", "q4_1", "q4_0")


@attrs.frozen
class ConvertedTensor:
    """One weight (rows, cols) in mlctrio's storage."""

    spec: QuantSpec
    arrays: list[npt.NDArray[Any]]
    source_type: str  # the GGUF type it came from
    lossless: bool
    source_nbytes: int = 0  # bytes of the GGUF data it came from
    how: str = ""  # how a lossy conversion was made (for the log); "" = re-quantized

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def _blocks(raw: npt.NDArray[np.uint8], block_bytes: int) -> npt.NDArray[np.uint8]:
    rows = raw.shape[0]
    return np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)


def _f16(blocks: npt.NDArray[np.uint8], at: int) -> npt.NDArray[np.float16]:
    return np.ascontiguousarray(blocks[:, :, at : at + 2]).view(np.float16)[:, :, 0]


def _nibbles(qs: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """(rows, blocks, 16) GGUF nibble bytes -> (rows, blocks * 32) elements in order."""
    rows = qs.shape[0]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, -1)


def from_q8_0(raw: npt.NDArray[np.uint8]) -> list[npt.NDArray[Any]]:
    b = _blocks(raw, 2 + QK)
    stored = (b[:, :, 2:] ^ np.uint8(0x80)).reshape(b.shape[0], -1)  # int8 q -> q + 128
    return [pack_words_np(stored, 8), _f16(b, 0).copy()]


def from_q4_0(raw: npt.NDArray[np.uint8]) -> list[npt.NDArray[Any]]:
    b = _blocks(raw, 2 + QK // 2)
    return [pack_words_np(_nibbles(b[:, :, 2:]), 4), _f16(b, 0).copy()]


def from_q5_0(raw: npt.NDArray[np.uint8]) -> list[npt.NDArray[Any]]:
    """Q5_0 -> q8_0, exactly: value (q - 16) * d with q < 32 is an int8 times the same d."""
    b = _blocks(raw, 2 + 4 + QK // 2)
    high = np.ascontiguousarray(b[:, :, 2:6]).view("<u4")  # (rows, blocks, 1): bit j of q_j
    bits = ((high >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.uint8).reshape(b.shape[0], -1)
    q = _nibbles(b[:, :, 6:]) | (bits << 4)
    stored = q + np.uint8(128 - 16)  # int8 q - 16, stored + 128
    return [pack_words_np(stored, 8), _f16(b, 0).copy()]


def from_q4_1(raw: npt.NDArray[np.uint8]) -> list[npt.NDArray[Any]]:
    b = _blocks(raw, 4 + QK // 2)
    scale_min = np.stack([_f16(b, 0), _f16(b, 2)], axis=2).reshape(b.shape[0], -1)
    return [pack_words_np(_nibbles(b[:, :, 4:]), 4), scale_min]


QK_K = 256  # elements per K-quant super-block


def _k4_scales(packed: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(rows, blocks, 12) bytes -> the 8 six-bit scales and 8 mins of each Q4_K super-block
    (llama.cpp's get_scale_min_k4)."""
    low_s, low_m = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    high_s = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    high_m = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    return np.concatenate([low_s, high_s], -1), np.concatenate([low_m, high_m], -1)


def from_q4_k(raw: npt.NDArray[np.uint8]) -> list[npt.NDArray[Any]]:
    """Q4_K -> q4_1 keeping every nibble: super-block (f16 d, f16 dmin, 12 bytes of 6-bit scales
    and mins, 128 bytes of nibbles) of 8 sub-blocks of 32; sub-block i's value is
    d * sc_i * q - dmin * m_i, a q4_1 block with scale d * sc_i and min -dmin * m_i (in f16).
    Sub-blocks 2j and 2j + 1 are the low and high nibbles of bytes 32j .. 32j + 31."""
    b = _blocks(raw, 4 + 12 + QK_K // 2)
    rows, blocks = b.shape[:2]
    d = _f16(b, 0).astype(np.float32)[..., None]
    dmin = _f16(b, 2).astype(np.float32)[..., None]
    scales, mins = _k4_scales(b[:, :, 4:16])
    qs = b[:, :, 16:].reshape(rows, blocks, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, blocks * QK_K)
    scale = (d * scales.astype(np.float32)).astype(np.float16)
    minimum = (-(dmin * mins.astype(np.float32))).astype(np.float16)
    return [pack_words_np(q, 4), np.stack([scale, minimum], axis=3).reshape(rows, -1)]


_EXACT = {"Q8_0": from_q8_0, "Q4_0": from_q4_0, "Q4_1": from_q4_1, "Q5_0": from_q5_0}
# Not bit-exact, but no re-quantization: (reader, what the log says it cost).
_NEAR = {"Q4_K": (from_q4_k, "nibbles kept, sub-block scales and mins rounded to f16")}
_QUANTIZERS = {"q8_0": from_q8_0, "q4_0": from_q4_0, "q4_1": from_q4_1}  # spec -> its reader


def _gguf() -> Any:
    import gguf

    return gguf


def quantize_to(w: npt.NDArray[np.floating], spec_name: str) -> list[npt.NDArray[Any]]:
    """Float (rows, cols) -> stored arrays of a GGUF-native format, quantized by the gguf
    package's reference quantizers (llama.cpp's `quantize_row_*_ref`)."""
    if spec_name in ("q0f32", "q0f16"):
        return [np.ascontiguousarray(w, dtype=get_quantization(spec_name).weight_dtype)]
    if spec_name not in _QUANTIZERS:  # mlctrio's own formats (q0bf16, q4f32_1, q8f16_1, ...)
        return quantize_weight_np(w, get_quantization(spec_name))
    gguf = _gguf()
    qtype = getattr(gguf.GGMLQuantizationType, spec_name.upper())
    raw = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
    return _QUANTIZERS[spec_name](raw)


def stored_spec(type_name: str) -> str:
    """The spec a GGUF type is stored as (natively or after conversion)."""
    if type_name in NATIVE:
        return NATIVE[type_name]
    return "q4_1" if type_name in TO_Q4_1 else "q8_0"


def convert(raw: npt.NDArray[Any], type_name: str, cols: int) -> ConvertedTensor:
    """A GGUF tensor's data (rows, bytes per row) -> stored arrays. `cols`: elements per row."""
    size = int(raw.nbytes)
    if type_name in ("F32", "F16"):
        spec = get_quantization(NATIVE[type_name])
        return ConvertedTensor(spec, [np.ascontiguousarray(raw)], type_name, True, size)
    if type_name == "BF16":
        bits = np.ascontiguousarray(raw).view(np.uint16).reshape(raw.shape[0], cols)
        return ConvertedTensor(get_quantization("q0bf16"), [bits], type_name, True, size)
    if type_name in _EXACT:
        spec = get_quantization(NATIVE[type_name])
        return ConvertedTensor(spec, _EXACT[type_name](raw), type_name, True, size)
    if type_name in _NEAR and cols % QK_K == 0:
        read, how = _NEAR[type_name]
        spec = get_quantization(stored_spec(type_name))
        return ConvertedTensor(spec, read(raw), type_name, False, size, how)
    gguf = _gguf()
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    w = gguf.quants.dequantize(np.ascontiguousarray(raw), qtype).reshape(raw.shape[0], cols)
    target = stored_spec(type_name)
    stored = quantize_to(w, target)
    return ConvertedTensor(get_quantization(target), stored, type_name, False, size)


def widest(specs: list[QuantSpec]) -> QuantSpec:
    return min(specs, key=lambda s: WIDTH.index(s.name))


def fuse_rows(parts: list[ConvertedTensor], cols: int) -> ConvertedTensor:
    """Concatenate weights along their rows (q, k, v -> qkv; gate, up -> gate_up). Parts in
    different formats are brought to the widest of them first (not bit-exact then)."""
    target = widest([p.spec for p in parts])
    same = [p.spec == target for p in parts]
    arrays = [
        p.arrays if ok else quantize_to(effective_weight_np(p.arrays, p.spec, cols), target.name)
        for p, ok in zip(parts, same, strict=True)
    ]
    fused = [np.concatenate(group, axis=0) for group in zip(*arrays, strict=True)]
    lossless = all(p.lossless for p in parts) and all(same)
    sources = "+".join(sorted({p.source_type for p in parts}))
    size = sum(p.source_nbytes for p in parts)
    hows = {p.how for p in parts if not p.lossless}
    how = hows.pop() if len(hows) == 1 and all(same) else ""
    return ConvertedTensor(target, fused, sources, lossless, size, how)
