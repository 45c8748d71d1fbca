"""Mixture-of-experts GGUF files (models/gguf_moe.py) beyond the converter's own output: the
older per-expert 2-D tensors, fused gate_up experts, a Qwen3-MoE layer without a router, and
K-quant experts (stacked 3-D Q4_K / Q6_K tensors converted per row).

The files are rewritten from the tiny Mixtral / Qwen3-MoE fixtures (tests/data/families/*/gguf,
llama.cpp's converter); their tensors must read back as the stacked originals do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlctrio.errors import ModelLoadError
from mlctrio.models.gguf_file import GGUFModel
from mlctrio.models.gguf_moe import convert_experts
from mlctrio.models.gguf_quants import convert
from mlctrio.models.quantization import effective_weight_np

gguf = pytest.importorskip("gguf")

FAMILIES = Path(__file__).parent.parent / "data" / "families"
Tensors = dict[str, np.ndarray]


def _rewrite(src: Path, dst: Path, edit: Callable[[Tensors], Tensors], **keys: Any) -> Path:
    """`src`'s architecture keys (plus `keys`) and float tensors, as `edit` changes them."""
    model = GGUFModel.open(src)
    arch = model.architecture
    writer = gguf.GGUFWriter(str(dst), arch)
    meta = {k: v for k, v in model.metadata.items() if k.startswith(f"{arch}.")}
    meta[f"{arch}.vocab_size"] = len(model.metadata["tokenizer.ggml.tokens"])  # no tokenizer
    for key, value in {**meta, **{f"{arch}.{k}": v for k, v in keys.items()}}.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, float(value))
    tensors = edit({t.name: np.asarray(t.data, np.float32) for t in model.reader.tensors})
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _stacked(family: str) -> tuple[Path, dict[str, np.ndarray]]:
    path = FAMILIES / family / "gguf" / "model.gguf"
    return path, GGUFModel.open(path).weights()


def test_per_expert_tensors_read_as_the_stacked_ones(tmp_path: Path) -> None:
    """Older Mixtral files: blk.N.ffn_gate.E.weight etc., one 2-D tensor per expert."""
    src, want = _stacked("mixtral")

    def split(t: Tensors) -> Tensors:
        out = {}
        for name, array in t.items():
            base, part = name.split(".ffn_", 1) if "_exps." in name else (name, "")
            if not part:
                out[name] = array
                continue
            proj = part.split("_exps")[0]
            out.update({f"{base}.ffn_{proj}.{e}.weight": a for e, a in enumerate(array)})
        return out

    got = GGUFModel.open(_rewrite(src, tmp_path / "split.gguf", split)).weights()
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_fused_gate_up_experts_read_as_the_separate_ones(tmp_path: Path) -> None:
    """`--fuse-gate-up-exps`: ffn_gate_up_exps (E, 2 I, H), each expert's gate rows first."""
    src, want = _stacked("qwen3_moe")

    def fuse(t: Tensors) -> Tensors:
        out = dict(t)
        for i in range(3):
            gate, up = (
                out.pop(f"blk.{i}.ffn_gate_exps.weight"),
                out.pop(f"blk.{i}.ffn_up_exps.weight"),
            )
            out[f"blk.{i}.ffn_gate_up_exps.weight"] = np.concatenate([gate, up], axis=1)
        return out

    got = GGUFModel.open(_rewrite(src, tmp_path / "fused.gguf", fuse)).weights()
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_qwen3_moe_layer_without_router_is_dense(tmp_path: Path) -> None:
    """llama.cpp's converter never writes one; a layer with ffn_gate / ffn_up / ffn_down and no
    ffn_gate_inp is read as a dense MLP (mlp_only_layers), and expert_weights_norm is read."""
    src, want = _stacked("qwen3_moe")
    rng = np.random.default_rng(0)

    def densify(t: Tensors) -> Tensors:
        out = {k: v for k, v in t.items() if not k.startswith("blk.1.ffn_") or "norm" in k}
        out["blk.1.ffn_gate.weight"] = rng.standard_normal((128, 64), np.float32)
        out["blk.1.ffn_up.weight"] = rng.standard_normal((128, 64), np.float32)
        out["blk.1.ffn_down.weight"] = rng.standard_normal((64, 128), np.float32)
        return out

    model = GGUFModel.open(
        _rewrite(src, tmp_path / "dense.gguf", densify, expert_weights_norm=False)
    )
    c = model.config()
    assert c.mlp_only_layers == (1,) and c.norm_topk_prob is False
    got = model.weights()
    assert got["model.layers.1.mlp.gate_up_proj.weight"].shape == (256, 64)
    assert not any(k.startswith("model.layers.1.mlp.moe") for k in got)
    np.testing.assert_array_equal(
        got["model.layers.2.mlp.moe_down_proj.weight"],
        want["model.layers.2.mlp.moe_down_proj.weight"],
    )


def test_shared_experts_are_refused(tmp_path: Path) -> None:
    src, _ = _stacked("qwen3_moe")
    path = _rewrite(src, tmp_path / "shared.gguf", dict, expert_shared_count=1)
    with pytest.raises(ModelLoadError, match="shared experts"):
        GGUFModel.open(path).config()


def _k_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Random but finite K-quant rows (rows, bytes): random bits, small f16 super-scales."""
    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":  # d, dmin first
        raw[..., 0:4] = scales.reshape(rows, cols // block, 4)
    else:  # Q6_K: d last
        raw[..., size - 2 :] = scales[..., 0:2]
    return raw.reshape(rows, -1)


def test_k_quant_stacked_experts_convert_per_row() -> None:
    """A 3-D Q4_K gate (E x I rows of 256) and a Q6_K up: the stored gate_up is each expert's
    gate rows then up rows, within one q8_0 step of llama.cpp's dequantization (Q4_K keeps its
    nibbles as q4_1; Q6_K is re-quantized as q8_0, the wider, which gate follows)."""
    rng = np.random.default_rng(1)
    experts, rows, cols = 3, 32, 256
    raw = {"gate": _k_blocks(rng, experts * rows, cols, "Q4_K"),
           "up": _k_blocks(rng, experts * rows, cols, "Q6_K")}  # fmt: skip
    types = {"gate": "Q4_K", "up": "Q6_K"}

    def conv(name: str) -> Any:
        return convert(raw[name].reshape(experts * rows, -1), types[name], cols)

    def deq(name: str) -> np.ndarray:
        qtype = getattr(gguf.GGMLQuantizationType, types[name])
        return gguf.quants.dequantize(raw[name], qtype).reshape(experts, rows, cols)

    t = convert_experts([["gate"], ["up"]], experts, cols, conv)
    assert t.spec.name == "q8_0" and not t.lossless
    assert [a.shape[:2] for a in t.arrays] == [(experts, 2 * rows)] * 2
    got = effective_weight_np([a.reshape(experts * 2 * rows, -1) for a in t.arrays], t.spec, cols)
    want = np.concatenate([deq("gate"), deq("up")], axis=1).reshape(experts * 2 * rows, cols)
    step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # one q8_0 step
    assert np.all(np.abs(got - want).reshape(-1, 32) <= step)

    down = convert_experts([["gate"]], experts, cols, conv)  # alone: q4_1, nibbles kept
    assert down.spec.name == "q4_1" and down.arrays[0].shape[:2] == (experts, rows)
    flat = [a.reshape(experts * rows, -1) for a in down.arrays]
    np.testing.assert_allclose(
        effective_weight_np(flat, down.spec, cols).reshape(experts, rows, cols), deq("gate"),
        atol=2e-3 * 0.02 * 64, rtol=2e-3,
    )  # fmt: skip
