"""GGUF files as mlctrio reads them: config, scheme, weights (Q/K un-permuted), tokenizer, errors.

Two independent sources: bench/to_gguf.py writes the demo checkpoint as llama.cpp's converter
would (Q/K rows permuted for ggml's RoPE), so reading it back must give the HF weights exactly;
and the real SmolLM2 file, whose tensors must equal the gguf package's own dequantization.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.to_gguf import convert as write_gguf
from mlctrio.errors import ModelLoadError
from mlctrio.models.artifact import load_mlc_named, open_artifact
from mlctrio.models.demo import ensure_demo_model
from mlctrio.models.gguf_file import GGUFModel, find_gguf, unpermute_rows
from mlctrio.models.quantization import effective_weight_np
from mlctrio.runtime.model_loader import tokenizer_and_template

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf("demo://tiny", out / f"tiny-{t}.gguf", t, verbose=False)
            for t in ("f32", "q8_0")}  # fmt: skip


def test_f32_file_reads_back_the_checkpoint_exactly(tiny_gguf: dict[str, Path]) -> None:
    hf_art = open_artifact(ensure_demo_model("tiny"))
    art = open_artifact(tiny_gguf["f32"])
    assert art.format == "gguf" and art.quantization == "q0f32"  # act= only with quantized weights
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip
    for field in fields:
        assert getattr(art.config, field) == getattr(hf_art.config, field), field
    want = load_mlc_named(hf_art)  # the HF checkpoint, fused the same way
    got = load_mlc_named(art)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)  # incl. un-permuted Q/K


def test_q8_0_file_is_stored_natively(tiny_gguf: dict[str, Path]) -> None:
    art = open_artifact(tiny_gguf["q8_0"], activations="q8")
    assert art.quantization.startswith("q8_0") and art.quantization.endswith(";act=q8")
    got = load_mlc_named(art)
    hf = load_mlc_named(open_artifact(ensure_demo_model("tiny")))  # q0f32, MLC names
    name = "model.layers.1.self_attn.qkv_proj"
    spec = art.gguf.scheme().spec_for(name)
    w = effective_weight_np([got[f"{name}.{n}"] for n in spec.stored_names], spec)
    scale = np.abs(hf[f"{name}.weight"]).max()
    np.testing.assert_allclose(w, hf[f"{name}.weight"], atol=scale / 127)  # one q8 step


def test_tokenizer_and_template_come_from_the_file(smollm2_gguf: Path) -> None:
    art = open_artifact(smollm2_gguf)
    tokenizer, template = tokenizer_and_template(art)
    prompt = template.render([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode(prompt), skip_special_tokens=False) == prompt


def test_smollm2_config_scheme_and_exact_tensors(smollm2_gguf: Path) -> None:
    model = GGUFModel.open(smollm2_gguf)
    c = model.config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (30, 576, 9)
    assert (c.num_key_value_heads, c.vocab_size, c.rope_theta) == (3, 49152, 100000.0)
    assert c.tie_word_embeddings and c.context_window_size == 8192
    scheme = model.scheme()
    assert scheme.name == "q4_1;model.embed_tokens=q8_0"
    weights = model.weights()
    tensors = {t.name: t for t in model.reader.tensors}

    def deq(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, t.shape[0])

    def ours(module: str) -> np.ndarray:
        spec = scheme.spec_for(module)
        return effective_weight_np([weights[f"{module}.{n}"] for n in spec.stored_names], spec)

    np.testing.assert_array_equal(ours("model.embed_tokens"), deq("token_embd.weight"))
    qkv = np.concatenate([unpermute_rows(deq("blk.7.attn_q.weight"), 9),
                          unpermute_rows(deq("blk.7.attn_k.weight"), 3),
                          deq("blk.7.attn_v.weight")])  # fmt: skip
    np.testing.assert_array_equal(ours("model.layers.7.self_attn.qkv_proj"), qkv)
    np.testing.assert_array_equal(
        ours("model.layers.7.mlp.down_proj"), deq("blk.7.ffn_down.weight")
    )


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(6 * 2 * 4 * 3).reshape(6 * 8, 3)
    heads = 6
    # llama.cpp's LlamaModel.permute
    permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)


def test_files_and_directories(tmp_path: Path, tiny_gguf: dict[str, Path]) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tiny_gguf["f32"], one / "m.gguf")
    assert find_gguf(one) == one / "m.gguf" and open_artifact(one).format == "gguf"
    shutil.copy(tiny_gguf["q8_0"], one / "n.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        find_gguf(one)
    with pytest.raises(ModelLoadError, match="--quantization does not apply"):
        open_artifact(tiny_gguf["f32"], "q4f32_1")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf["f32"].read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        open_artifact(broken)


def test_phi3_file_reads_fused_tensors_and_longrope() -> None:
    """llama.cpp's converter on the tiny Phi-3 (tests/data/families/phi3): attn_qkv and ffn_up
    (gate rows, then up) are HF's fused tensors; LongRoPE's factors are tensors and its
    attention factor metadata, which read back into the same config as config.json's."""
    family = Path(__file__).parent.parent / "data" / "families" / "phi3"
    hf_art, art = open_artifact(family), open_artifact(family / "gguf")
    assert art.format == "gguf" and art.config.model_type == "phi3"
    differs = {k for k, v in art.config.to_dict().items() if hf_art.config.to_dict()[k] != v}
    assert differs == {"rms_norm_eps"}  # stored as float32
    want, got = load_mlc_named(hf_art), load_mlc_named(art)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_mixtral_file_reads_back_the_checkpoint() -> None:
    """llama.cpp's converter on the tiny Mixtral: architecture "llama" with expert_count; the
    stacked ffn_*_exps and the router read back as the HF checkpoint's experts (Q/K un-permuted),
    and the config is config.json's."""
    family = Path(__file__).parent.parent / "data" / "families" / "mixtral"
    hf_art, art = open_artifact(family), open_artifact(family / "gguf")
    assert art.config.model_type == "mixtral" and art.config.num_experts == 4
    assert art.gguf.architecture == "llama"
    differs = {k for k, v in art.config.to_dict().items() if hf_art.config.to_dict()[k] != v}
    assert differs == {"rms_norm_eps"}  # stored as float32
    want, got = load_mlc_named(hf_art), load_mlc_named(art)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_qwen3_moe_file_config_and_expert_mapping() -> None:
    """Architecture qwen3moe: experts of expert_feed_forward_length, renormalised (llama.cpp
    hard-codes it), every layer sparse; moe_gate_up_proj is each expert's ffn_gate_exps rows
    then its ffn_up_exps rows, moe_down_proj ffn_down_exps, the router ffn_gate_inp (E, H)."""
    path = Path(__file__).parent.parent / "data" / "families" / "qwen3_moe" / "gguf" / "model.gguf"
    model = GGUFModel.open(path)
    c = model.config()
    assert (c.model_type, c.num_experts, c.num_experts_per_tok) == ("qwen3_moe", 4, 2)
    assert (c.moe_intermediate_size, c.intermediate_size) == (64, 128)
    assert c.norm_topk_prob is True and c.mlp_only_layers is None and c.qk_norm
    assert model.scheme().name == "q0f32"
    got = model.weights()
    raw = {t.name: np.asarray(t.data) for t in model.reader.tensors}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.mlp", f"blk.{i}"
        gate_up = np.concatenate(
            [raw[f"{b}.ffn_gate_exps.weight"], raw[f"{b}.ffn_up_exps.weight"]], 1
        )
        np.testing.assert_array_equal(got[f"{p}.moe_gate_up_proj.weight"], gate_up)
        np.testing.assert_array_equal(
            got[f"{p}.moe_down_proj.weight"], raw[f"{b}.ffn_down_exps.weight"]
        )
        np.testing.assert_array_equal(got[f"{p}.gate.weight"], raw[f"{b}.ffn_gate_inp.weight"])
        assert got[f"{p}.gate.weight"].dtype == np.float32
        assert f"{p}.gate_up_proj.weight" not in got


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'falcon' is not supported"):
        open_artifact(path)
