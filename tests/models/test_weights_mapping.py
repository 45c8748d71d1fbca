"""HF -> MLC names -> packed params, and the q4 packing layout (no compilation needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest

from mlctrio.models.llama_config import TINY, LlamaConfig
from mlctrio.models.quantization import (
    TILE16,
    dequantize_group_np,
    get_quantization,
    pack_tile_np,
    quantize_group_np,
    unpack_tile_np,
)
from mlctrio.models.weights import (
    hf_to_mlc,
    hf_to_params,
    mlc_to_params,
    param_infos,
    random_hf_weights,
)


def test_mlc_names_are_the_model_parameters_in_order() -> None:
    for quant in ("q0f32", "q4f16_1"):
        infos = param_infos(TINY, quant)
        mlc = hf_to_mlc(TINY, random_hf_weights(TINY), quant)
        assert sorted(mlc) == sorted(i.name for i in infos)
        suffix = "q_weight" if quant.startswith("q4") else "weight"
        assert infos[0].name.startswith("model.embed_tokens.")
        assert f"model.layers.0.self_attn.qkv_proj.{suffix}" in mlc
        for info in infos:
            assert mlc[info.name].shape == info.shape, info.name


def test_round_trip_fuses_qkv_and_gate_up() -> None:
    hf = random_hf_weights(TINY, seed=3)
    infos = param_infos(TINY, "q0f32", cpu=False)  # MLC's layout: rows are output features
    params = dict(zip([i.name for i in infos], hf_to_params(TINY, hf, "q0f32", infos), strict=True))
    a = "model.layers.1.self_attn"
    qkv = params[f"{a}.qkv_proj.weight"]
    q_rows = TINY.num_attention_heads * TINY.head_dim
    kv_rows = TINY.num_key_value_heads * TINY.head_dim
    np.testing.assert_array_equal(qkv[:q_rows], hf[f"{a}.q_proj.weight"])
    np.testing.assert_array_equal(qkv[q_rows : q_rows + kv_rows], hf[f"{a}.k_proj.weight"])
    np.testing.assert_array_equal(qkv[q_rows + kv_rows :], hf[f"{a}.v_proj.weight"])
    gu = params["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(
        gu[: TINY.intermediate_size], hf["model.layers.1.mlp.gate_proj.weight"]
    )
    np.testing.assert_array_equal(
        gu[TINY.intermediate_size :], hf["model.layers.1.mlp.up_proj.weight"]
    )
    np.testing.assert_array_equal(params["lm_head.weight"], hf["lm_head.weight"])


def test_q0f16_mlc_dtypes_and_cast_back() -> None:
    mlc = hf_to_mlc(TINY, random_hf_weights(TINY), "q0f16")
    assert mlc["model.norm.weight"].dtype == np.float16  # as mlc-llm stores q0f16
    infos = param_infos(TINY, "q0f16")
    params = dict(zip([i.name for i in infos], mlc_to_params(mlc, infos), strict=True))
    assert params["model.norm.weight"].dtype == np.float32  # CPU keeps norms f32
    assert params["model.layers.0.mlp.down_proj.weight"].dtype == np.float16


def test_mlc_to_params_rejects_mismatches() -> None:
    infos = param_infos(TINY, "q0f32")
    mlc = hf_to_mlc(TINY, random_hf_weights(TINY), "q0f32")
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        mlc_to_params({k: v for k, v in mlc.items() if k != "model.norm.weight"}, infos)
    with pytest.raises(ValueError, match="shape"):
        mlc_to_params({**mlc, "model.norm.weight": np.ones(3, np.float32)}, infos)
    q4 = hf_to_mlc(TINY, random_hf_weights(TINY), "q4f32_1")
    with pytest.raises(KeyError):  # a q4 checkpoint does not load into a q0 model
        mlc_to_params(q4, infos)


def test_tied_embeddings_ignore_lm_head_and_untied_require_it() -> None:
    tied = LlamaConfig.from_hf({**_hf_cfg(), "tie_word_embeddings": True})
    mlc = hf_to_mlc(tied, random_hf_weights(TINY), "q0f32")
    assert not any(k.startswith("lm_head") for k in mlc)
    hf = random_hf_weights(TINY)
    del hf["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head"):
        hf_to_mlc(TINY, hf, "q0f32")


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_cpu_params_take_the_tile16_layout(quant: str, tied: bool) -> None:
    config = attrs.evolve(TINY, vocab_size=320, tie_word_embeddings=tied)
    mlc = hf_to_mlc(config, random_hf_weights(config, seed=5), quant)
    infos = param_infos(config, quant)
    params = dict(zip([i.name for i in infos], mlc_to_params(mlc, infos), strict=True))
    layouts = {i.name: i.layout for i in infos}
    # Every linear weight (320 and all TINY widths split into tiles of 16) is tile16, except an
    # embedding table that is not also the lm_head; norms stay as they are.
    embed = [n for n in layouts if n.startswith("model.embed_tokens.")]
    linear = [
        n
        for n in layouts
        if n not in embed and (".q_" in n or n.endswith("_proj.weight") or "lm_head" in n)
    ]
    assert linear and all(layouts[n] == TILE16 for n in linear)
    assert all(layouts[n] == (TILE16 if tied else "") for n in embed)
    assert layouts["model.norm.weight"] == ""
    for info in infos:
        arr = params[info.name]
        assert arr.shape == info.runtime_shape and arr.flags["C_CONTIGUOUS"]
        if info.layout == TILE16:
            # Element (n, x) of the MLC array sits at [n // 16, x, n % 16].
            assert info.runtime_shape == (info.shape[0] // 16, info.shape[1], 16)
            n, x = info.shape[0] - 3, info.shape[1] - 1
            assert arr[n // 16, x, n % 16] == mlc[info.name][n, x]
            np.testing.assert_array_equal(unpack_tile_np(arr), mlc[info.name])
        else:
            np.testing.assert_array_equal(arr, mlc[info.name].astype(arr.dtype))


def test_tile16_stays_off_where_features_do_not_tile() -> None:
    infos = {i.name: i for i in param_infos(TINY, "q0f32")}  # vocab 300 = 18.75 tiles
    assert infos["lm_head.weight"].layout == ""
    assert infos["lm_head.weight"].runtime_shape == (300, TINY.hidden_size)
    assert infos["model.layers.0.mlp.down_proj.weight"].layout == TILE16
    assert not any(i.layout for i in param_infos(TINY, "q0f32", cpu=False))
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    assert pack_tile_np(w)[1, 2, 5] == w[21, 2]


def test_group_quant_layout_matches_mlc() -> None:
    spec = get_quantization("q4f32_1")
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = np.arange(-3, 5) * 0.5  # max |w| = 2 in the group -> scale = 2/7
    w[0, 31] = -2.0
    q, scale = quantize_group_np(w, spec)
    assert q.dtype == np.uint32 and q.shape == (1, 4) and scale.shape == (1, 1)
    np.testing.assert_allclose(scale, [[2.0 / 7]], rtol=1e-6)
    nibbles = [(int(q[0, 0]) >> (4 * e)) & 0xF for e in range(8)]  # element e at bits 4e
    assert nibbles == [round(v / (2 / 7)) + 7 for v in w[0, :8]]
    assert (int(q[0, 3]) >> 28) & 0xF == 0  # -2.0 -> -7 + 7
    np.testing.assert_allclose(dequantize_group_np(q, scale), w, atol=(2 / 7) / 2 + 1e-6)


def test_group_quant_error_bound_and_partial_group() -> None:
    spec = get_quantization("q4f16_1")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 80)).astype(np.float32)  # 80 = 2.5 groups: padded like mlc-llm
    q, scale = quantize_group_np(w, spec)
    assert q.shape == (5, 12) and scale.shape == (5, 3) and scale.dtype == np.float16
    back = dequantize_group_np(q, scale, spec.group_size, cols=80)
    step = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :80]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-3 * step + 1e-7)


def test_config_from_hf_variants() -> None:
    c = LlamaConfig.from_hf(
        {
            **_hf_cfg(),
            "model_type": "qwen2",
            "max_position_embeddings": 32768,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert c.attention_bias and c.context_window_size == 32768 and c.head_dim == 16
    assert c.rope_scaling is not None and c.rope_scaling["factor"] == 8.0
    m = LlamaConfig.from_hf(
        {
            **_hf_cfg(),
            "model_type": "mistral",
            "sliding_window": 4096,
            "max_position_embeddings": 32768,
        }
    )
    assert m.sliding_window == 4096 and not m.attention_bias
    # A real sliding window on every layer; the context is the model's own.
    assert m.context_window_size == 32768 and m.layer_types == ("sliding",) * m.num_hidden_layers
    assert not m.rope_in_model  # one RoPE base: the KV cache rotates
    wide = LlamaConfig.from_hf(
        {
            **_hf_cfg(),
            "model_type": "mistral",
            "sliding_window": 65536,
            "max_position_embeddings": 32768,
        }
    )
    assert wide.context_window_size == 32768 and wide.layer_types is None
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf({**_hf_cfg(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _hf_cfg() -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
    }


def test_host_target_drops_vnni_the_cpu_does_not_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hypervisor may hide AVX512-VNNI on a CPU whose name implies it: the host target must not
    claim it, or the int8 kernels would be compiled in and die with SIGILL."""
    from tvm.target import codegen

    from mlctrio.models import target as target_mod
    from mlctrio.models.llama import has_vnni

    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: "znver4")
    monkeypatch.setattr(target_mod, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512bw"})
    target = target_mod.host_cpu_target()
    assert str(target.attrs["mcpu"]) == "znver4" and not has_vnni(target)
    monkeypatch.setattr(target_mod, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert has_vnni(target_mod.host_cpu_target())


PHI3 = Path(__file__).parent.parent / "data" / "families" / "phi3"


def _phi3_hub_cfg(**changes: object) -> dict:
    """A Phi-3-mini-128k-style config.json (transformers 4.x spelling), tiny."""
    return {
        **_hf_cfg(),
        "model_type": "phi3",
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "sliding_window": 262144,
        **changes,
    }


def test_phi3_config_longrope_both_spellings() -> None:
    c = LlamaConfig.from_hf(json.loads((PHI3 / "config.json").read_text()))
    assert c.model_type == "phi3" and c.context_window_size == 128 and c.rotary_dim is None
    rs = c.rope_scaling
    assert rs is not None and rs["rope_type"] == "longrope"
    assert rs["original_max_position_embeddings"] == 32
    assert rs["attention_factor"] == float(np.float32(math.sqrt(1 + math.log(4) / math.log(32))))
    assert rs["long_factor"][1] == float(np.float32(1.3))  # transformers' float32 factors
    assert c.rope_in_model and c.layer_types is None and c.sliding_window is None
    hub = LlamaConfig.from_hf(_phi3_hub_cfg())
    assert hub.rope_type == "longrope" and hub.layer_types is None  # window >= context
    assert hub.rope_scaling is not None and hub.rope_scaling["attention_factor"] == float(
        np.float32(math.sqrt(1 + math.log(32) / math.log(4096)))
    )
    # Our own to_dict reads back to the same config, and leaves out rotary_dim while unused.
    assert "rotary_dim" not in c.to_dict()
    assert LlamaConfig.from_hf(json.loads(json.dumps(c.to_dict()))) == c


def test_phi3_config_variants_and_refusals() -> None:
    # Phi-3-mini-4k: plain RoPE (in the cache), a real sliding window of 2047 on every layer.
    mini = LlamaConfig.from_hf(
        _phi3_hub_cfg(rope_scaling=None, max_position_embeddings=4096, sliding_window=2047)
    )
    assert mini.rope_scaling is None and not mini.rope_in_model
    assert mini.sliding_window == 2047 and mini.layer_types == ("sliding",) * 2
    # Phi-4-mini: partial_rotary_factor 0.75 (top level), factors for the rotated pairs only.
    partial = _phi3_hub_cfg(
        partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
    )
    p = LlamaConfig.from_hf(partial)
    assert p.rotary_dim == 12 and p.rope_dim == 12 and p.to_dict()["rotary_dim"] == 12
    assert LlamaConfig.from_hf(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="rotary_dim / 2"):
        LlamaConfig.from_hf(_phi3_hub_cfg(partial_rotary_factor=0.75))
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf(_phi3_hub_cfg(rope_scaling={"type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="activation"):
        LlamaConfig.from_hf(_phi3_hub_cfg(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_scaling"):  # longrope is Phi-3's only
        LlamaConfig.from_hf({**_phi3_hub_cfg(), "model_type": "llama"})


def test_longrope_factor_set_follows_the_served_window() -> None:
    """Long factors when the context window exceeds original_max_position_embeddings, short
    otherwise, for every position; inverse frequencies exactly transformers' float32 ones."""
    from mlctrio.models.llama import layer_inv_freq

    ref = json.loads((PHI3 / "reference.json").read_text())["full_logits_check"]["longrope"]
    c = LlamaConfig.from_hf(json.loads((PHI3 / "config.json").read_text()))
    assert c.longrope_factors == c.rope_scaling["long_factor"]
    np.testing.assert_array_equal(layer_inv_freq(c, 1), np.float32(ref["long_inv_freq"]))
    assert c.for_context_window(128) is c and c.for_context_window(33) is c
    short = c.for_context_window(32)
    assert short.context_window_size == 32
    assert short.longrope_factors == c.rope_scaling["short_factor"]
    np.testing.assert_array_equal(layer_inv_freq(short, 0), np.float32(ref["short_inv_freq"]))
    assert np.float32(short.rope_attention_factor) == np.float32(ref["attention_factor"])
    assert TINY.for_context_window(16) is TINY  # no LongRoPE: the window is the engine's


def test_phi3_fused_checkpoint_weights_map_like_split_ones() -> None:
    c = LlamaConfig.from_hf(json.loads((PHI3 / "config.json").read_text()))
    hf = random_hf_weights(c, seed=5)
    a, m = "model.layers.1.self_attn", "model.layers.1.mlp"
    assert f"{a}.qkv_proj.weight" in hf and f"{a}.q_proj.weight" not in hf
    assert f"{m}.gate_up_proj.weight" in hf and f"{m}.gate_proj.weight" not in hf
    split = dict(hf)
    for i in range(c.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        q, k, v = np.split(split.pop(f"{a}.qkv_proj.weight"), [64, 96])
        split.update({f"{a}.q_proj.weight": q, f"{a}.k_proj.weight": k, f"{a}.v_proj.weight": v})
        gate, up = np.split(split.pop(f"{m}.gate_up_proj.weight"), 2)
        split.update({f"{m}.gate_proj.weight": gate, f"{m}.up_proj.weight": up})
    fused, unfused = hf_to_mlc(c, hf, "q0f32"), hf_to_mlc(c, split, "q0f32")
    assert sorted(fused) == sorted(i.name for i in param_infos(c, "q0f32"))
    for name, arr in fused.items():
        np.testing.assert_array_equal(arr, unfused[name], err_msg=name)
