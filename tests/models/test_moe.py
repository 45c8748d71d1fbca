"""Mixture-of-experts layers (models/moe.py, te_moe.py, moe_weights.py) beyond the family
fixtures of test_families.py (which check Mixtral and Qwen3-MoE against transformers at q0f32).

- The routing kernel against transformers' semantics written in numpy, on inputs where a
  sloppy top-k goes wrong: ties (the lower expert id first), probabilities that underflow to
  0, -inf and huge logits, top_k = E, with and without renormalisation.
- Config parsing of both spellings (num_experts / num_local_experts), decoder_sparse_step and
  mlp_only_layers; the weight mapping of both naming schemes into stacked tensors; an MoE GGUF
  file that says too little refused (never read as a dense model).
- Compiled (slow): quantized experts (the tile16 group kernel, and the dequantise-per-tile one
  for a width that is not whole groups; with experts of whole groups, the grouped GEMM of
  several-token steps too) equal the float model on the dequantised weights, in prefill, decode
  and batched decode; and a step never reads an expert it did not choose: NaN in every unchosen
  expert leaves the logits finite and unchanged.
- The grouped GEMM (moe_grouped.py) against the per-token path and numpy on chosen routings:
  experts without rows, an expert in every token, one token, many (moe_paths.py compiles both).
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest

from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import (
    TILE16,
    effective_weight_np,
    get_quantization,
    quantize_weight_np,
    unpack_tile_np,
)
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, param_infos, random_hf_weights

FAMILIES = Path(__file__).parent.parent / "data" / "families"

# A tiny MoE: experts of 40 (down's inputs are not whole groups of 32: the dequantise-per-tile
# kernel; gate_up's are: the tile16 group kernel), one dense layer.
MOE = LlamaConfig(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
    context_window_size=256,
    model_type="qwen3_moe",
    qk_norm=True,
    num_experts=6,
    num_experts_per_tok=3,
    moe_intermediate_size=40,
    norm_topk_prob=True,
    mlp_only_layers=(1,),
)
# Experts of 32 (whole groups): q4 / q8 experts take the grouped GEMM's tile16 kernels in steps
# of several tokens (MOE's take the per-token path there: its down inputs are not whole groups).
MOE32 = attrs.evolve(MOE, moe_intermediate_size=32)


def _route_reference(logits: np.ndarray, top_k: int, normalize: bool) -> tuple:
    """transformers: softmax in float32, top-k of the probabilities, renormalised."""
    x = logits.astype(np.float32)
    with np.errstate(over="ignore"):  # -3e38 - 3e38 = -inf, probability 0 (as in torch)
        e = np.exp(x - x.max(axis=1, keepdims=True))
    p = (e * (np.float32(1) / e.sum(axis=1, keepdims=True))).astype(np.float32)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :top_k]  # ties: the lower id first
    w = np.take_along_axis(p, ids, axis=1)
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    return w.astype(np.float32), ids.astype(np.int32)


@pytest.fixture(scope="module")
def route():
    import tvm

    from mlctrio.models.target import host_cpu_target
    from mlctrio.models.te_moe import route_func

    def _run(logits: np.ndarray, top_k: int, normalize: bool) -> tuple:
        n, experts = logits.shape
        func = route_func(experts, top_k, normalize).with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=host_cpu_target())
        w = tvm.runtime.tensor(np.zeros((n, top_k), np.float32))
        ids = tvm.runtime.tensor(np.zeros((n, top_k), np.int32))
        lib["main"](tvm.runtime.tensor(logits.astype(np.float32)), w, ids)
        return w.numpy(), ids.numpy()

    return _run


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_matches_transformers_on_tricky_logits(route, normalize: bool) -> None:
    rng = np.random.default_rng(0)
    rows = [
        rng.standard_normal(8) * 3,
        np.zeros(8),  # all tied: experts 0, 1, 2
        [1.0, 2.0, 2.0, 0.5, 2.0, -1.0, 2.0, 0.0],  # four tied at the top
        [0.0, -200.0, -300.0, 5.0, -250.0, -1e4, -1e30, 1.0],  # probabilities underflow to 0
        [-np.inf, 0.0, -np.inf, 1.0, -np.inf, -np.inf, 2.0, -np.inf],
        [3e38, -3e38, 0.0, 1.0, 3e38, 2.0, -1.0, 0.5],  # huge: 0 and 4 tie at probability 1/2
        np.full(8, -7.0),
    ]
    logits = np.array(rows, np.float32)
    for top_k in (1, 3, 8):
        w, ids = route(logits, top_k, normalize)
        want_w, want_ids = _route_reference(logits, top_k, normalize)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(w, want_w, rtol=1e-6, atol=1e-7)
        assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()  # distinct
    w, ids = route(np.zeros((1, 8), np.float32), 3, normalize)
    assert ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(w, [[1 / 3] * 3] if normalize else [[1 / 8] * 3], rtol=1e-6)


def test_moe_configs_in_both_spellings() -> None:
    cfg = json.loads((FAMILIES / "qwen3_moe" / "config.json").read_text())
    c = LlamaConfig.from_hf(cfg)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (4, 2, 64)
    assert c.norm_topk_prob and c.qk_norm and c.mlp_only_layers == (1,)
    assert [c.is_moe_layer(i) for i in range(3)] == [True, False, True]
    hub = {k: v for k, v in cfg.items() if k != "num_local_experts"}
    assert LlamaConfig.from_hf({**hub, "num_experts": 4}) == c  # the Hub's spelling
    stepped = LlamaConfig.from_hf({**cfg, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert [stepped.is_moe_layer(i) for i in range(3)] == [False, True, False]
    assert not LlamaConfig.from_hf({**cfg, "norm_topk_prob": False}).norm_topk_prob
    assert not any(map(LlamaConfig.from_hf({**hub, "num_experts": 0}).is_moe_layer, range(3)))
    assert LlamaConfig.from_hf(json.loads(json.dumps(c.to_dict()))) == c
    mixtral = LlamaConfig.from_hf(json.loads((FAMILIES / "mixtral" / "config.json").read_text()))
    assert (mixtral.num_experts, mixtral.moe_intermediate_size) == (4, 128)
    assert mixtral.norm_topk_prob and mixtral.mlp_only_layers is None
    dense = LlamaConfig.from_hf({**cfg, "model_type": "qwen3"})
    assert dense.num_experts is None and "num_experts" not in dense.to_dict()
    with pytest.raises(ValueError, match="experts"):
        LlamaConfig.from_hf({**cfg, "num_experts_per_tok": 5})


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_are_stacked_under_mlc_names(family: str) -> None:
    config = attrs.evolve(MOE, model_type=family, qk_norm=family == "qwen3_moe")
    hf = random_hf_weights(config, seed=2)
    block, (gate, up, down) = {
        "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
        "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    }[family]
    assert f"model.layers.2.{block}.experts.5.{gate}.weight" in hf
    mlc = hf_to_mlc(config, hf, "q0f32")
    assert sorted(mlc) == sorted(i.name for i in param_infos(config, "q0f32"))
    m, src = "model.layers.2.mlp", f"model.layers.2.{block}"
    gu, dn = mlc[f"{m}.moe_gate_up_proj.weight"], mlc[f"{m}.moe_down_proj.weight"]
    assert gu.shape == (6, 80, 64) and dn.shape == (6, 64, 40)
    np.testing.assert_array_equal(gu[4, :40], hf[f"{src}.experts.4.{gate}.weight"])
    np.testing.assert_array_equal(gu[4, 40:], hf[f"{src}.experts.4.{up}.weight"])
    np.testing.assert_array_equal(dn[3], hf[f"{src}.experts.3.{down}.weight"])
    np.testing.assert_array_equal(mlc[f"{m}.gate.weight"], hf[f"{src}.gate.weight"])
    assert "model.layers.1.mlp.gate_up_proj.weight" in mlc  # the dense layer


def test_quantized_experts_take_the_tile16_layout_per_expert() -> None:
    hf = random_hf_weights(MOE, seed=4)
    mlc = hf_to_mlc(MOE, hf, "q4f32_1")
    infos = {i.name: i for i in param_infos(MOE, "q4f32_1")}
    params = dict(zip(infos, mlc_to_params(mlc, list(infos.values())), strict=True))
    gu = infos["model.layers.0.mlp.moe_gate_up_proj.q_weight"]
    assert gu.layout == TILE16 and gu.shape == (6, 80, 8)
    assert gu.runtime_shape == params[gu.name].shape == (6, 5, 8, 16)
    np.testing.assert_array_equal(unpack_tile_np(params[gu.name]), mlc[gu.name])
    # down's 40 inputs are not whole groups: MLC layout, dequantised per tile
    assert infos["model.layers.0.mlp.moe_down_proj.q_weight"].layout == ""
    assert infos["model.layers.0.mlp.gate.weight"].dtype == "float32"  # the router
    spec = get_quantization("q4f32_1")
    w = np.stack([hf[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(6)])
    one = quantize_weight_np(w[2], spec)
    np.testing.assert_array_equal(mlc["model.layers.0.mlp.moe_down_proj.q_weight"][2], one[0])


def test_an_moe_gguf_is_never_read_as_dense(tmp_path: Path) -> None:
    """A "llama" file with expert_count is Mixtral (models/gguf_moe.py; the converter's files
    are served in test_families.py); one that says too little is refused, not served dense."""
    import gguf

    from mlctrio.errors import ModelLoadError
    from mlctrio.models.artifact import open_artifact

    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")  # llama.cpp writes Mixtral as "llama"
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_vocab_size(4)
    writer.add_expert_count(8)  # and no expert_used_count
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="expert_used_count is missing"):
        open_artifact(path)


def _effective(hf: dict, quant: str) -> dict:
    """HF weights replaced by what a `quant` model multiplies by (routers stay float32)."""
    spec = get_quantization(quant)
    out = {}
    for name, w in hf.items():
        if w.ndim == 2 and not name.endswith(".gate.weight"):
            w = effective_weight_np(quantize_weight_np(w, spec), spec, w.shape[1])
        out[name] = w
    return out


def _run(runner, prompts: list[list[int]]) -> list[np.ndarray]:
    """Prefill each prompt (chunks of 5), two single decode steps, two batched ones."""
    out = []
    for s, prompt in enumerate(prompts):
        runner.add_sequence(s)
        for i in range(0, len(prompt), 5):
            logits = runner.step([(s, prompt[i : i + 5])])
        out.append(logits)
    for tok in (7, 11):
        out.append(runner.step([(0, [tok])]))
    for tok in (9, 13):
        out.append(runner.step([(s, [tok + s]) for s in range(len(prompts))]))
    for s in range(len(prompts)):
        runner.remove_sequence(s)
    return out


@pytest.fixture(scope="module")
def serve(lib_cache_dir: Path):
    from mlctrio.models.compile import compile_model
    from mlctrio.runtime.tvm_runner import TVMRunner

    def _serve(
        quant: str, hf: dict, unchosen_nan: int | None = None, config: LlamaConfig = MOE
    ) -> list[np.ndarray]:
        cm = compile_model(config, quant, cache_dir=lib_cache_dir)
        mlc = hf_to_mlc(config, hf, quant)
        if unchosen_nan is not None:  # every float tensor of experts >= unchosen_nan
            for name, arr in mlc.items():
                if ".moe_" in name and arr.dtype.kind == "f":
                    arr[unchosen_nan:] = np.nan
        params = mlc_to_params(mlc, cm.params)
        runner = TVMRunner(
            cm.lib_path, params, config, max_num_sequence=4, max_total_seq_length=512,
            prefill_chunk_size=64,
        )  # fmt: skip
        try:
            return _run(runner, [list(range(3, 20)), [5, 8, 2], list(range(100, 130))])
        finally:
            runner.close()

    return _serve


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quant", "config"), [("q4f32_1", MOE), ("q8f32_1", MOE), ("q4f32_1", MOE32)]
)
def test_quantized_experts_equal_float_on_dequantised_weights(
    serve, quant: str, config: LlamaConfig
) -> None:
    hf = random_hf_weights(config, seed=1, scale=0.2)
    got = serve(f"{quant};act=f32", hf, config=config)
    want = serve("q0f32", _effective(hf, quant), config=config)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quant", "config"), [("q0f32", MOE), ("q4f32_1", MOE), ("q4f32_1", MOE32)]
)
def test_a_step_reads_only_the_chosen_experts(serve, quant: str, config: LlamaConfig) -> None:
    """All-zero routers: every expert ties, so experts 0..top_k-1 are chosen for every token
    (the lower ids first). NaN in the others' stored weights (q4: their scales) must not reach
    the logits."""
    hf = random_hf_weights(config, seed=3, scale=0.2)
    for layer in (0, 2):
        p = f"model.layers.{layer}.mlp"
        hf[f"{p}.gate.weight"] = np.zeros_like(hf[f"{p}.gate.weight"])
    clean = serve(quant, hf, config=config)
    poisoned = serve(quant, hf, unchosen_nan=config.num_experts_per_tok, config=config)
    for c, p in zip(clean, poisoned, strict=True):
        assert np.isfinite(p).all()
        np.testing.assert_array_equal(c, p)


def test_bench_counts_only_the_active_experts() -> None:
    from bench.moe import qwen3_moe_scaled, step_bytes

    config = qwen3_moe_scaled(layers=1, experts=128, top_k=8)
    sizes = [
        ("model.embed_tokens.q_weight", 1000),  # untied: read a row at a time
        ("model.layers.0.mlp.gate.weight", 10),
        ("model.layers.0.mlp.moe_gate_up_proj.q_weight", 1280),
        ("model.layers.0.mlp.moe_down_proj.q_scale", 640),
        ("lm_head.q_weight", 1000),
    ]
    assert step_bytes(sizes, config) == (1000 + 10 + 80 + 40, 1000 + 10 + 1280 + 640)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q0f32", "q0bf16", "q4f32_1", "q8f32_1", "q4_1"])
def test_grouped_experts_equal_the_per_token_path(quant: str) -> None:
    """The grouped GEMM of several-token steps (moe_grouped.py) against the per-token path and
    a numpy reference, on routings with experts of no rows, an expert every token routes to, one
    token and many; poisoning the experts without rows changes nothing."""
    import tvm

    from tests.models.moe_paths import EXPERTS, build_paths, experts_reference, routings

    grouped, per_token, params, (gate_up, down) = build_paths(quant)
    rng = np.random.default_rng(7)
    for case, ids in routings(rng).items():
        x = rng.standard_normal((len(ids), gate_up.shape[2])).astype(np.float32)
        w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
        args = [tvm.runtime.tensor(a) for a in (x, w, ids, *params)]
        got, want = grouped(*args).numpy(), per_token(*args).numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=case)
        ref = experts_reference(x, w, ids, gate_up, down)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=case)
        unused = sorted(set(range(EXPERTS)) - set(ids.ravel().tolist()))
        if unused:
            poisoned = [p.copy() for p in params]
            for p in poisoned:  # every float expert tensor (q4 / q8: the scales)
                if p.dtype.kind == "f" and p.ndim >= 3 and p.shape[0] == EXPERTS:
                    p[unused] = np.nan
            args = [tvm.runtime.tensor(a) for a in (x, w, ids, *poisoned)]
            np.testing.assert_array_equal(grouped(*args).numpy(), got, err_msg=case)
