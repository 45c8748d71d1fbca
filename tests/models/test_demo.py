"""Demo checkpoints: deterministic bytes, loadable through formats + tokenizer + chat template,
and cached once by ensure_demo_model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlctrio.errors import ConfigError
from mlctrio.models import demo
from mlctrio.models.demo import PRESETS, ensure_demo_model, write_demo_model
from mlctrio.models.formats import read_safetensors
from mlctrio.runtime.chat_template import HFChatTemplate, load_chat_template
from mlctrio.runtime.tokenizer import load_tokenizer


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = write_demo_model(tmp_path / "again", "tiny", seed=0)
    assert _files(again) == _files(tiny)
    other = _files(write_demo_model(tmp_path / "other", "tiny", seed=1))
    assert other["model.safetensors"] != _files(tiny)["model.safetensors"]
    assert other["tokenizer.json"] == _files(tiny)["tokenizer.json"]


def test_tiny_loads_back(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["max_position_embeddings"] == 2048
    weights = read_safetensors(tiny)
    assert len(weights) == 3 + 9 * 2
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 176)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.float32 and 0.015 < q.std() < 0.025 and abs(q.mean()) < 0.005
    np.testing.assert_array_equal(weights["model.norm.weight"], np.ones(64, np.float32))

    tok = load_tokenizer(tiny)
    assert tok.vocab_size == config["vocab_size"] == 1000
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids[0] == im_end and config["eos_token_id"] == im_end
    assert tok.bos_token_id is None  # tokenizer_config says "bos_token": null
    text = "def f(x):\n    return x  # 日本 😀"
    assert tok.decode(tok.encode(text)) == text

    template = load_chat_template(tiny, tok)
    assert isinstance(template, HFChatTemplate)
    prompt = template.render([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(im_end) == 1


def test_ensure_demo_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCTRIO_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model("tiny")
    assert path.parent == tmp_path / "demo" and path.name.startswith("tiny-")
    left = [p.name for p in (tmp_path / "demo").iterdir() if p.suffix != ".lock"]
    assert left == [path.name]  # no temp dir left (the lock file beside the entry stays)

    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated a cached demo model")

    monkeypatch.setattr(demo, "write_demo_model", refuse)
    assert ensure_demo_model("tiny") == path
    assert ensure_demo_model("tiny", cache_dir=tmp_path) == path


def test_cache_key_follows_generator_version(monkeypatch: pytest.MonkeyPatch) -> None:
    key = demo.demo_cache_key("tiny")
    assert key == demo.demo_cache_key("tiny") != demo.demo_cache_key("small")
    monkeypatch.setattr(demo, "GENERATOR_VERSION", "next")
    assert demo.demo_cache_key("tiny") != key


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="huge"):
        write_demo_model(tmp_path, "huge")


def test_small_is_sharded_bf16(tmp_path: Path) -> None:
    path = ensure_demo_model("small", cache_dir=tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == 8000
    weights = read_safetensors(path, keep_bf16_bits=True)
    assert all(w.dtype == np.uint16 for w in weights.values())
    num_params = sum(w.size for w in weights.values())
    assert 50e6 < num_params < 100e6
    preset = PRESETS["small"]
    assert weights["lm_head.weight"].shape == (preset.vocab_size, preset.hidden_size)
    assert load_tokenizer(path).vocab_size == 8000
