"""Weight storage formats: their specs, mixed per-layer schemes, and the numpy side (no tvm).

A `QuantSpec` says how one linear (or embedding) weight W (out, in) is stored:

- kind "none": `weight` (out, in) in `weight_dtype` (float32 / float16), or bfloat16 kept as its
  uint16 bits (kind "bf16", widened in the kernel by a shift);
- kind "group": `q_weight` (out, in * bits / 32) uint32 + `q_scale` (out, in / group), one scale
  per group of 32 consecutive inputs of a row; with `has_min`, `q_scale` is (out, 2 * in / group),
  each group's scale then its min, so every group format has the same two tensors:
  * 4 bits: element k sits in word k // 8 at bits 4 * (k % 8) (mlc-llm's "NK" layout);
  * 8 bits: the 8 elements of a chunk c are split into word 2c (k = 8c + 0, 2, 4, 6) and word
    2c + 1 (k = 8c + 1, 3, 5, 7), one byte each, low byte first: the byte order in which
    int8_cpu.q8_quantize packs activations, so one `vpdpbusd` multiplies a word directly;
  * value = (stored - zero) * scale, or stored * scale + min with `has_min`.

| spec | stored | zero | scale | what it is |
|---|---|---|---|---|
| q4f32_1 / q4f16_1 | 4 bit | 7 | max abs / 7 | mlc-llm's group quantization (HF, on load) |
| q4_0 | 4 bit | 8 | f16 d | GGUF Q4_0, bit-exact |
| q4_1 | 4 bit | 0, + min | f16 d, f16 m | GGUF Q4_1, bit-exact |
| q8_0 | 8 bit | 128 | f16 d | GGUF Q8_0, bit-exact (int8 q stored as q + 128) |
| q8f32_1 / q8f16_1 | 8 bit | 128 | max abs / 127 | near-lossless 8 bit for HF checkpoints |

A model may mix specs per layer (GGUF files do: SmolLM2's Q4_1 file has a Q8_0 embedding): a
quantization *name* is then a scheme, "BASE;module=spec;module=spec" (`Scheme.parse`), where a
module is an nn.Module path such as `model.embed_tokens` or `model.layers.3.mlp.down_proj`. The
name is part of the compile-cache key.

A scheme also says how group-quantized layers take their activations (`act=`, ACTIVATIONS):
"q8" quantizes them to int8 per group of 32 and multiplies with VNNI (int8_cpu.py; llama.cpp's
q8_0 / q8_1 vec-dot types, with their f16 scales for the GGUF formats; about 2x faster
prefill), "f32" keeps them float (exact arithmetic on the stored weights, so a result does not
hinge on float summation order, which int8 rounding of a model with outlier activations turns
into different greedy tokens), "auto" is q8 on CPUs with AVX512-VNNI. docs/discussion/0006 has
the measurements.

On the CPU, linear weights whose output features split into tiles of 16 are re-laid out at load
time ("tile16", `pack_tile_np`): (out, x) -> (out / 16, x, 16). Files keep their own layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.models.formats import bf16_to_f32

NUM_BITS = 4
ELEMS_PER_WORD = 32 // NUM_BITS  # 8 nibbles per uint32
MAX_INT = 2 ** (NUM_BITS - 1) - 1  # 7: the zero point of mlc-llm's stored nibble
TILE = 16  # output features per tile of the "tile16" CPU layout
GROUP_ROWS = 4  # rows per register block of the q4 decode kernel ("matmul_group")
# ... and of the other forms a library exports (`batch_decode_r2`, `batch_decode_r8`): a weight
# conversion shared by the rows of a block, so 2 rows are cheapest in blocks of 2 and 5-8 in
# one block of 8 (docs/discussion/0005 section 5), and 3-4 in GROUP_ROWS
DECODE_ROW_BLOCKS = (2, 8)


def decode_row_block(rows: int) -> int:
    """The row block of the float group kernel that decodes `rows` rows cheapest."""
    narrow, wide = DECODE_ROW_BLOCKS
    return narrow if rows == narrow else GROUP_ROWS if rows <= GROUP_ROWS else wide


TILE16 = "tile16"


@attrs.frozen
class QuantSpec:
    """How one weight is stored (see the module docstring).

    `mlc_dtype` is the dtype mlc-llm stores the *unquantized* params in (norms, biases, scales)
    for this quantization name; our own packed params keep those in float32 on the CPU.
    """

    name: str
    kind: Literal["none", "bf16", "group"]
    weight_dtype: str  # storage dtype of plain weights, or "uint32" (group) / "uint16" (bf16)
    scale_dtype: str  # dtype of q_scale and q_min (kind "group"); unused otherwise
    mlc_dtype: str
    group_size: int = 32
    bits: int = 4  # group: 4 or 8
    zero: int = MAX_INT  # group: the stored value of 0 (unused with has_min)
    has_min: bool = False  # group: value = stored * scale + min
    # group, int8 activations: their scale d and sum s rounded to f16, as llama.cpp's q8_0 / q8_1
    # blocks hold them (the GGUF formats: llama.cpp's arithmetic; docs/discussion/0006 §6)
    f16_act_scales: bool = False

    @property
    def is_group(self) -> bool:
        return self.kind == "group"

    @property
    def elems_per_word(self) -> int:
        return 32 // self.bits

    @property
    def stored_names(self) -> tuple[str, ...]:
        """The parameter names of a weight in this format, in the module's order."""
        return ("q_weight", "q_scale") if self.is_group else ("weight",)

    @property
    def scales_per_group(self) -> int:
        """Columns of q_scale per group: the scale, and the min with `has_min`."""
        return 2 if self.has_min else 1

    def bytes_per_weight(self) -> float:
        """Storage bytes per weight element, scales and mins included."""
        if not self.is_group:
            return float(np.dtype(self.weight_dtype).itemsize)
        per_group = np.dtype(self.scale_dtype).itemsize * (2 if self.has_min else 1)
        return self.bits / 8 + per_group / self.group_size


def _group(
    name: str, bits: int, zero: int, scale: str, mlc: str, has_min: bool = False, gguf: bool = False
) -> QuantSpec:
    return QuantSpec(name, "group", "uint32", scale, mlc, 32, bits, zero, has_min, gguf)


QUANTIZATIONS: dict[str, QuantSpec] = {
    "q0f32": QuantSpec("q0f32", "none", "float32", "float32", "float32"),
    "q0f16": QuantSpec("q0f16", "none", "float16", "float16", "float16"),
    "q0bf16": QuantSpec("q0bf16", "bf16", "uint16", "float32", "float32"),
    "q4f16_1": _group("q4f16_1", 4, MAX_INT, "float16", "float16"),
    "q4f32_1": _group("q4f32_1", 4, MAX_INT, "float32", "float32"),
    "q4_0": _group("q4_0", 4, 8, "float16", "float32", gguf=True),
    "q4_1": _group("q4_1", 4, 0, "float16", "float32", has_min=True, gguf=True),
    "q8_0": _group("q8_0", 8, 128, "float16", "float32", gguf=True),
    "q8f16_1": _group("q8f16_1", 8, 128, "float16", "float16"),
    "q8f32_1": _group("q8f32_1", 8, 128, "float32", "float32"),
}
# What `--quantization` offers for HF checkpoints (GGUF files and MLC artifacts keep theirs).
HF_QUANTIZATIONS = ("q0f32", "q0f16", "q4f16_1", "q4f32_1", "q8f16_1", "q8f32_1")


def get_quantization(name: str) -> QuantSpec:
    """Look one storage format up by name (see QUANTIZATIONS)."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; known: {sorted(QUANTIZATIONS)}") from None


ACTIVATIONS = ("auto", "f32", "q8")


@attrs.frozen
class Scheme:
    """The storage format of every weight of a model (a default plus per-module overrides), and
    how group-quantized layers take their activations (ACTIVATIONS)."""

    default: QuantSpec
    overrides: Mapping[str, QuantSpec] = attrs.field(factory=dict, hash=False)
    activations: str = attrs.field(default="auto")

    @activations.validator
    def _check(self, _attribute: object, value: str) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"activations {value!r}: expected one of {ACTIVATIONS}")

    @classmethod
    def parse(cls, name: str) -> Scheme:
        """ "q4_1" or "q4_1;model.embed_tokens=q8_0;act=f32" (ValueError for unknown names)."""
        base, *items = (part.strip() for part in name.split(";"))
        overrides, activations = {}, "auto"
        for item in filter(None, items):
            module, sep, spec = item.partition("=")
            if not sep:
                raise ValueError(f"quantization scheme item {item!r} is not module=format")
            if module.strip() == "act":
                activations = spec.strip()
            else:
                overrides[module.strip()] = get_quantization(spec.strip())
        return cls(get_quantization(base), overrides, activations)

    @property
    def name(self) -> str:
        items = [f"{m}={s.name}" for m, s in sorted(self.overrides.items()) if s != self.default]
        return ";".join([self.default.name, *items, *self._act_item])

    @property
    def _act_item(self) -> list[str]:
        """["act=..."] where it matters (float weights take float inputs anyway), else []."""
        if self.activations != "auto" and any(spec.is_group for spec in self.specs):
            return [f"act={self.activations}"]
        return []

    @property
    def summary(self) -> str:
        """The name, short enough for a log line: "q8_0 + q4_1 x27, act=f32" (a mixed GGUF's
        full name lists every module)."""
        counts: dict[str, int] = {}
        for spec in self.overrides.values():
            if spec != self.default:
                counts[spec.name] = counts.get(spec.name, 0) + 1
        parts = [self.default.name, *(f"{n} x{c}" for n, c in sorted(counts.items()))]
        return ", ".join([" + ".join(parts), *self._act_item])

    def with_activations(self, activations: str) -> Scheme:
        return attrs.evolve(self, activations=activations)

    def spec_for(self, module: str) -> QuantSpec:
        return self.overrides.get(module, self.default)

    @property
    def specs(self) -> set[QuantSpec]:
        return {self.default, *self.overrides.values()}


def as_scheme(quantization: str | QuantSpec | Scheme) -> Scheme:
    if isinstance(quantization, Scheme):
        return quantization
    if isinstance(quantization, QuantSpec):
        return Scheme(quantization)
    return Scheme.parse(quantization)


def summary(quantization: str) -> str:
    """`Scheme.summary` of a quantization name (the name itself when it does not parse)."""
    try:
        return Scheme.parse(quantization).summary
    except ValueError:
        return quantization


def uses_int8(spec: QuantSpec, out_features: int, in_features: int) -> bool:
    """Whether this linear layer takes int8 activations (int8_cpu.py) on a CPU with VNNI:
    group-quantized, tile16 layout, whole groups."""
    return (
        spec.is_group
        and spec.group_size == 32
        and out_features % TILE == 0
        and in_features % spec.group_size == 0
    )


# -- layouts ----------------------------------------------------------------------------------


def pack_tile_np(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """(out, x) -> (out / TILE, x, TILE): the "tile16" layout of a CPU linear weight (stacked
    experts (E, out, x) -> (E, out / TILE, x, TILE): each expert's own)."""
    *lead, rows, cols = arr.shape
    tiled = arr.reshape(*lead, rows // TILE, TILE, cols)
    return np.ascontiguousarray(np.swapaxes(tiled, -1, -2))


def unpack_tile_np(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Inverse of `pack_tile_np`."""
    *lead, tiles, cols, _ = arr.shape
    return np.ascontiguousarray(np.swapaxes(arr, -1, -2).reshape(*lead, tiles * TILE, cols))


def pack_words_np(stored: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.uint32]:
    """Stored integers (rows, cols) in [0, 2**bits) -> uint32 words in the spec's layout."""
    rows, cols = stored.shape
    if bits == 4:
        q = stored.astype(np.uint32).reshape(rows, cols // 8, 8)
        shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
        return np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)
    # 8 bits: per chunk of 8, the even elements then the odd ones, 4 bytes a word.
    b = stored.astype(np.uint8).reshape(rows, cols // 8, 4, 2).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(b).reshape(rows, cols // 4 * 4).view(np.uint32).copy()


def unpack_words_np(words: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.uint8]:
    """Inverse of `pack_words_np`: (rows, cols) stored integers as uint8."""
    rows, n = words.shape
    if bits == 4:
        shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
        nib = (words[:, :, None] >> shifts) & np.uint32(0xF)
        return nib.reshape(rows, n * 8).astype(np.uint8)
    b = np.ascontiguousarray(words).view(np.uint8).reshape(rows, n // 2, 2, 4)
    return np.ascontiguousarray(b.transpose(0, 1, 3, 2)).reshape(rows, n * 4)


# -- numpy: quantize HF weights on load, and dequantize for the reference forward --------------


def quantize_group_np(
    w: npt.NDArray[np.floating], spec: QuantSpec
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.floating]]:
    """Quantize a 2-D weight (rows, cols) along cols -> (q_weight, q_scale), symmetric:
    scale = max|w| / qmax, stored = round(w / scale) + zero (4 bit: 7, 8 bit: 128)."""
    rows, cols = w.shape
    g = spec.group_size
    groups = -(-cols // g)
    # Like mlc-llm, a partial last group is padded (with zeros).
    wf = np.zeros((rows, groups * g), np.float32)
    wf[:, :cols] = w
    wf = wf.reshape(rows, groups, g)
    qmax = MAX_INT if spec.bits == 4 else 127
    scale = (np.abs(wf).max(axis=2) / qmax).astype(spec.scale_dtype)
    # Quantize against the scale as stored (possibly rounded to f16) so that dequantization is
    # exactly the value the kernel computes; an all-zero group gets scale 0.
    s32 = scale.astype(np.float32)[:, :, None]
    safe = np.where(s32 == 0, 1.0, s32)
    q = np.clip(np.round(wf / safe), -qmax, qmax) + spec.zero
    return pack_words_np(q.reshape(rows, groups * g), spec.bits), scale


def dequantize_group_np(
    q_weight: npt.NDArray[np.uint32],
    q_scale: npt.NDArray[np.floating],
    group_size: int = 32,
    cols: int | None = None,
    *,
    bits: int = 4,
    zero: int = MAX_INT,
    has_min: bool = False,
) -> npt.NDArray[np.float32]:
    """The float32 weight (rows, cols) of group-quantized storage, padding cut."""
    stored = unpack_words_np(q_weight, bits).astype(np.float32)
    scales = q_scale.astype(np.float32)
    scale = np.repeat(scales[:, 0::2] if has_min else scales, group_size, axis=1)
    if has_min:
        out = stored * scale + np.repeat(scales[:, 1::2], group_size, axis=1)
    else:
        out = (stored - zero) * scale
    out = out.astype(np.float32)
    return out if cols is None else out[:, :cols]


def quantize_weight_np(w: npt.NDArray[np.floating], spec: QuantSpec) -> list[npt.NDArray]:
    """Stored arrays of a linear/embedding weight under `spec` (HF checkpoints; symmetric group
    formats only: q4_1 and q4_0 come from GGUF files as they are)."""
    if spec.is_group:
        if spec.has_min or spec.zero not in (MAX_INT, 128):
            raise ValueError(f"{spec.name} is read from GGUF files, not produced on load")
        return list(quantize_group_np(w, spec))
    if spec.kind == "bf16":
        from mlctrio.models.formats import f32_to_bf16

        return [f32_to_bf16(np.asarray(w, np.float32))]
    return [np.ascontiguousarray(w, dtype=spec.weight_dtype)]


def effective_weight_np(
    stored: list[npt.NDArray], spec: QuantSpec, cols: int | None = None
) -> npt.NDArray[np.float32]:
    """The float32 weight the compiled kernel effectively multiplies by (for the reference)."""
    if spec.is_group:
        return dequantize_group_np(
            stored[0], stored[1], spec.group_size, cols, bits=spec.bits, zero=spec.zero,
            has_min=spec.has_min,
        )  # fmt: skip
    if spec.kind == "bf16":
        return bf16_to_f32(stored[0])
    return stored[0].astype(np.float32)


def q8_blocks_np(
    x: npt.NDArray[np.float32], group: int = 32, f16_scales: bool = True
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """x (..., K) as int8_cpu.q8_quantize quantizes it, per group of `group`: q = rint(x * (127 /
    max|x|)) in float32 arithmetic, d = max|x| / 127, s = d * sum q; with `f16_scales` d and s
    rounded to f16 (llama.cpp's x86 quantize_row_q8_0 / q8_1). Returns q (..., K / group, group)
    and d, s (..., K / group), all float32."""
    g = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    amax = np.abs(g).max(axis=-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(g * inv[..., None])
    d = (amax / np.float32(127)).astype(np.float32)
    s = (d * q.sum(axis=-1, dtype=np.float32)).astype(np.float32)
    if f16_scales:
        return q, d.astype(np.float16).astype(np.float32), s.astype(np.float16).astype(np.float32)
    return q, d, s


def q8_linear_np(
    x: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    spec: QuantSpec,
    mins: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """x (n, K) @ w.T (w: the effective weight (out, K) stored as `spec`) as int8_cpu's kernels
    compute it: the activations rounded by `q8_blocks_np`; with a min (`mins`: (out, K / 32) of
    a has_min format) each group's min is multiplied by s rather than d * sum q, as llama.cpp's
    ggml_vec_dot_q4_1_q8_1 does."""
    q, d, s = q8_blocks_np(x, spec.group_size, spec.f16_act_scales)
    y = (q * d[..., None]).reshape(x.shape) @ w.T
    if mins is not None:
        y = y + (s - d * q.sum(axis=-1)) @ mins.T
    return y.astype(np.float32)
