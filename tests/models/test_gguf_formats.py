"""GGUF weight formats (q4_0, q4_1, q8_0, bf16, mixed per layer) through the compiled model.

Weights are quantized with the `gguf` package's reference quantizers (llama.cpp's
`quantize_row_*_ref`), converted to mlctrio's storage by gguf_quants, compiled, and the logits
compared with the numpy reference multiplying by the same effective weights (ATOL as in
test_tvm_model.py: float32 summation order is the only difference left). The conversion itself
is checked to be bit-exact against gguf's dequantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlctrio.models.compile import compile_model, host_cpu_target
from mlctrio.models.gguf_quants import convert, quantize_to
from mlctrio.models.llama import has_vnni
from mlctrio.models.llama_config import TINY
from mlctrio.models.quantization import Scheme, effective_weight_np, get_quantization
from mlctrio.models.reference import ReferenceLlama
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, random_hf_weights
from mlctrio.runtime.tvm_runner import TVMRunner

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow
ATOL = 1e-4
# With int8 activations (VNNI CPUs) the arithmetic is discontinuous: an activation rounded to
# int8, its scale to f16 (llama.cpp's q8_0 / q8_1 blocks). A float32 summation-order difference
# between TVM and numpy (~1e-7) then flips a rounding where the reference lies within ~2e-5 of
# an int8 tie or ~1e-6 of an f16 boundary, and that sequence's logits move by 0.007-0.03 from
# there on (measured: 5 of 12 weight seeds of this test have such rows, at most 3 of its 8). The
# kernels' arithmetic is checked exactly in test_int8_cpu.py; here every row must be within
# ATOL_INT8 and most rows within ATOL (a real bug moves them all).
ATOL_INT8 = 0.1


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "BF16"])
def test_conversion_is_bit_exact(qtype: str) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 96)) * 0.1).astype(np.float32)
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    t = convert(raw, qtype, 96)
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    assert t.lossless
    np.testing.assert_array_equal(effective_weight_np(t.arrays, t.spec, 96), want)


def test_q4_k_keeps_its_nibbles_and_rounds_only_the_sub_block_scales() -> None:
    """Q4_K (256-element super-blocks of 8 sub-blocks with 6-bit scales and mins) becomes q4_1
    block for block: the only error is the f16 rounding of d * sc and dmin * m, under 2^-11 of
    a value's magnitude; re-quantizing the dequantized values (the old way) was ~70x worse."""
    rng = np.random.default_rng(2)
    qtype = gguf.GGMLQuantizationType.Q4_K
    # gguf has no Q4_K quantizer: random super-blocks (any bytes are valid, given finite d, dmin)
    blocks = rng.integers(0, 256, (32, 2, 144), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-2, (32, 2, 2)).astype(np.float16)
    blocks[:, :, 0:4] = d.view(np.uint8).reshape(32, 2, 4)
    raw = blocks.reshape(32, 288)
    want = gguf.quants.dequantize(raw, qtype).reshape(32, 512)
    t = convert(raw, "Q4_K", 512)
    assert t.spec.name == "q4_1" and not t.lossless and "nibbles kept" in t.how
    got = effective_weight_np(t.arrays, t.spec, 512)
    bound = np.abs(want).max(axis=1, keepdims=True) * 2.0**-10  # scale and min each round
    assert (np.abs(got - want) <= bound).all()
    requantized = effective_weight_np(quantize_to(want, "q4_1"), get_quantization("q4_1"), 512)
    assert np.abs(requantized - want).max() > 10 * np.abs(got - want).max()


def _scheme_weights(scheme: Scheme, seed: int) -> dict[str, np.ndarray]:
    """TINY's random weights with every linear weight stored as `scheme` says."""
    mlc = hf_to_mlc(TINY, random_hf_weights(TINY, seed=seed), "q0f32")
    out = {}
    for name, array in mlc.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and array.ndim == 2:
            spec = scheme.spec_for(module)
            for stored_name, stored in zip(
                spec.stored_names, quantize_to(array, spec.name), strict=True
            ):
                out[f"{module}.{stored_name}"] = stored
        else:
            out[name] = array
    return out


SCHEMES = {
    "q4_0": "q4_0",
    "q4_1": "q4_1",
    "q8_0": "q8_0",
    "bf16": "q0bf16",
    "q8f32_1": "q8f32_1",  # HF checkpoints quantized on load to 8 bit (same kernel as q8_0)
    "q4_1_f32_act": "q4_1;act=f32",  # GGUF files' default: float activations on a VNNI CPU
    "mixed": "q4_1;model.embed_tokens=q8_0;model.layers.1.mlp.down_proj=q4_0"
    ";model.layers.0.self_attn.qkv_proj=q0f16",
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compiled_matches_reference(name: str, lib_cache_dir: Path) -> None:
    scheme = Scheme.parse(SCHEMES[name])
    cm = compile_model(TINY, scheme.name, cache_dir=lib_cache_dir)
    weights = _scheme_weights(scheme, seed=5)
    runner = TVMRunner(
        cm.lib_path,
        mlc_to_params(weights, cm.params),
        TINY,
        max_num_sequence=4,
        max_total_seq_length=1024,
        prefill_chunk_size=128,
    )
    int8 = has_vnni(host_cpu_target()) and scheme.activations != "f32"
    ref = ReferenceLlama(TINY, weights, scheme, int8=int8)
    cache = ref.new_cache()
    rng = np.random.default_rng(0)
    for seq in (0, 1, 2):
        runner.add_sequence(seq)
        cache.add_sequence(seq)
    prompts = {s: rng.integers(0, TINY.vocab_size, n).tolist() for s, n in ((0, 37), (1, 5))}
    batches = [
        [(0, prompts[0]), (1, prompts[1])],  # ragged prefill
        [(0, [3]), (1, [7])],  # batch decode
        [(2, [11])],  # decode at batch 1 of a fresh sequence
        [(0, [1]), (1, [2]), (2, [4])],
    ]
    errors = []
    for batch in batches:
        got = runner.step(batch)
        want = np.stack([ref.forward(cache, s, t)[-1] for s, t in batch])
        if not int8:
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        errors.extend(np.abs(got - want).max(axis=1))
    if int8:
        assert max(errors) < ATOL_INT8, errors
        assert np.mean(np.array(errors) < ATOL) >= 0.5, errors


def test_specs_describe_their_storage() -> None:
    assert get_quantization("q4_1").bytes_per_weight() == pytest.approx(20 / 32)  # as GGUF Q4_1
    assert get_quantization("q8_0").bytes_per_weight() == pytest.approx(34 / 32)
    assert Scheme.parse("q4_1;lm_head=q8_0").spec_for("lm_head").name == "q8_0"
    with pytest.raises(ValueError, match="unknown quantization"):
        Scheme.parse("q4_1;lm_head=q3_9")
