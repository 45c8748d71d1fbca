"""int8_cpu's kernels against llama.cpp's x86 int8 arithmetic, written out here from ggml's
source (ggml-cpu/arch/x86/quants.c, llama.cpp 0.3.36):

- `quantize_row_q8_0` / `quantize_row_q8_1`, per block of 32: amax = max|x|, d = amax / 127.f,
  q = round-half-even(x * (127.f / amax)); the block stores d as f16 and (q8_1) s = f16(d * sum q);
- `ggml_vec_dot_q8_0_q8_0`: sum over blocks of f16 d_w * f16 d_x * sum(q_w * q_x);
- `ggml_vec_dot_q4_1_q8_1`: sum over blocks of d_w * d_x * sum(q_w * q_x) + m_w * s_x.

The f16 roundings of d and s matter: without them (as int8_cpu did before) every matmul of a
GGUF model differed from llama.cpp's by ~2e-4 (q8_0) to ~9e-4 (q4_1) relative, measured on
SmolLM2-135M's first layer; with them, by float32 summation order alone (~1e-7). They apply to
the GGUF formats (QuantSpec.f16_act_scales); mlc-llm's formats keep d = max|x| / 127 in f32.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlctrio.models import int8_cpu
from mlctrio.models.gguf_quants import convert
from mlctrio.models.llama import has_vnni
from mlctrio.models.quantization import QUANTIZATIONS, pack_tile_np, q8_blocks_np, unpack_words_np
from mlctrio.models.target import host_cpu_target

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(
    not has_vnni(host_cpu_target()), reason="int8_cpu's kernels need AVX512-VNNI"
)
K, OUT, ROWS = 96, 32, 5  # 3 groups, 2 tiles of 16, a partial block of 4 rows


def _llama_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q8_1 on x (rows, K): q (rows, K / 32, 32), f16 d, f16 s, and
    the f32 d it rounds (q8_0 is the same without s)."""
    g = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(g).max(axis=2)
    d32 = amax / np.float32(127)
    q = np.rint(g * (np.float32(127) / amax)[..., None]).astype(np.int64)
    d = d32.astype(np.float16).astype(np.float64)
    s = (d32 * q.sum(axis=2).astype(np.float32)).astype(np.float16).astype(np.float64)
    return q, d, s, d32.astype(np.float64)


def _inputs(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, K)).astype(np.float32)
    x[1, 5] = 40.0  # an outlier, as in the real model's activations
    return x


def _compile(func: tvm.tirx.PrimFunc, name: str) -> tvm.runtime.Module:
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    return tvm.compile(mod, target=host_cpu_target())[name]


def _quantize(x: np.ndarray, f16: bool = True) -> tuple[tvm.runtime.Tensor, tvm.runtime.Tensor]:
    xq = tvm.runtime.tensor(np.zeros((ROWS, K // 8, 2), np.int32))
    xd = tvm.runtime.tensor(np.zeros((ROWS, K // 32, int8_cpu.XD), np.float32))
    func = int8_cpu.q8_quantize_func(K, f16)
    _compile(func, "q8_quantize")(tvm.runtime.tensor(x[:, None, :]), xq, xd)
    return xq, xd


def test_q8_quantize_is_llama_cpps_quantize_row_q8_1() -> None:
    x = _inputs(0)
    q, d, s, d32 = _llama_q8_1(x)
    assert (d != d32).any()  # the f16 rounding is visible on these inputs
    xq, xd = _quantize(x)
    got = xd.numpy()
    np.testing.assert_array_equal(got[..., 0], d)
    np.testing.assert_array_equal(got[..., 1], q.sum(axis=2))
    np.testing.assert_array_equal(got[..., 2], s)
    # xq: per chunk of 8 inputs, the bytes of the even inputs, then of the odd ones
    stored = unpack_words_np(xq.numpy().reshape(ROWS, -1).view(np.uint32), 8)
    np.testing.assert_array_equal(stored.view(np.int8).reshape(q.shape), q)
    # the numpy reference (models/reference.py) rounds the same way
    ref_q, ref_d, ref_s = q8_blocks_np(x)
    np.testing.assert_array_equal(ref_q, q)
    np.testing.assert_array_equal(ref_d, d)
    np.testing.assert_array_equal(ref_s, s)


def test_mlc_formats_keep_f32_activation_scales() -> None:
    x = _inputs(3)
    q, _, _, d32 = _llama_q8_1(x)
    got = _quantize(x, f16=False)[1].numpy()
    np.testing.assert_array_equal(got[..., 0], d32)
    np.testing.assert_array_equal(got[..., 1], q.sum(axis=2))
    flagged = {name for name, spec in QUANTIZATIONS.items() if spec.f16_act_scales}
    assert flagged == {"q4_0", "q4_1", "q8_0"}  # the GGUF block formats


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("rows_block", [1, int8_cpu.ROWS_BLOCK])
def test_group_q8_matmul_is_llama_cpps_vec_dot(qtype: str, rows_block: int) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((OUT, K)) * 0.05 + (0.02 if qtype == "Q4_1" else 0)).astype(np.float32)
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    t = convert(raw, qtype, K)
    spec = t.spec
    x = _inputs(2)
    q, d, s, d32 = _llama_q8_1(x)
    # the weights' blocks as llama.cpp reads them (ints, f16 scale, f16 min)
    qw = unpack_words_np(t.arrays[0], spec.bits).astype(np.int64).reshape(OUT, -1, 32)
    scales = t.arrays[1].astype(np.float64)
    dw = scales[:, 0::2] if spec.has_min else scales
    qw = qw if spec.has_min else qw - spec.zero
    isum = np.einsum("rbk,obk->rob", q, qw).astype(np.float64)

    def vec_dot(dx: np.ndarray, sx: np.ndarray) -> np.ndarray:
        out = (isum * dw[None] * dx[:, None]).sum(axis=2)
        return out + (scales[None, :, 1::2] * sx[:, None]).sum(axis=2) if spec.has_min else out

    want = vec_dot(d, s)
    func = int8_cpu.group_q8_matmul_func(
        OUT // 16, K, rows_block, spec.scale_dtype, spec.bits, spec.zero, spec.has_min
    )
    y = tvm.runtime.tensor(np.zeros((ROWS, 1, OUT // 16, 16), np.float32))
    assert spec.f16_act_scales
    xq, xd = _quantize(x)
    stored = [tvm.runtime.tensor(pack_tile_np(a)) for a in t.arrays]
    _compile(func, "group_q8_matmul")(xq, xd, *stored, y)
    got = y.numpy().reshape(ROWS, OUT)
    tol = 2e-6 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    unrounded = vec_dot(d32, d32 * q.sum(axis=2))  # the scales as int8_cpu used to keep them
    assert np.abs(unrounded - want).max() > 10 * tol
