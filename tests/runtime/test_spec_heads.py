"""Medusa heads and EAGLE's draft layer in numpy (runtime/medusa.py, runtime/eagle.py), and
their files (runtime/spec_heads.py): what they draft is what their definitions say, EAGLE's
incremental K/V gives the drafts a fresh computation gives, files round-trip, and the shipped
heads are found for the model they were trained for only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from mlctrio.errors import ConfigError
from mlctrio.runtime.draft_head import DraftHead
from mlctrio.runtime.eagle import EagleLayer, EagleProposer
from mlctrio.runtime.hidden_tap import HiddenTap
from mlctrio.runtime.medusa import MedusaHeads, MedusaProposer
from mlctrio.runtime.spec_heads import (
    SHIPPED,
    check_shapes,
    check_target,
    find_shipped,
    read_heads,
    write_heads,
)

H, V = 16, 40


@attrs.define(eq=False)
class FakeBranch:
    tokens: list[int]
    seq_id: int | None = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_slice(self, a: int, b: int) -> list[int]:
        return self.tokens[a:b]


@attrs.frozen
class Shape:
    hidden_size: int = H
    vocab_size: int = V
    num_hidden_layers: int = 2


def _head(rng: np.random.Generator) -> DraftHead:
    vocab = np.sort(rng.choice(V, size=24, replace=False)).astype(np.int32)
    return DraftHead(vocab, rng.normal(size=(24, H)).astype(np.float32))


def test_medusa_drafts_are_each_heads_argmax() -> None:
    rng = np.random.default_rng(0)
    head = _head(rng)
    heads = MedusaHeads(
        rng.normal(size=(3, H, H)).astype(np.float32) * 0.3,
        rng.normal(size=(3, H)).astype(np.float32),
        head,
    )
    tap = HiddenTap(H, keep=8)
    h = rng.normal(size=(6, H)).astype(np.float32)
    tap.record(5, 0, h)
    branch = FakeBranch(list(range(7)), seq_id=5)  # 6 cached tokens + the pending one
    (draft,) = MedusaProposer(heads, tap).propose([branch], [3])
    x = h[5]
    want = []
    for i in range(3):
        a = heads.weight[i] @ x + heads.bias[i]
        y = x + a / (1 + np.exp(-a))  # h + SiLU(W h + b)
        want.append(int(head.vocab[np.argmax(head.rows @ y)]))
    assert draft == want
    # no hidden state for the last cached position: no draft
    assert MedusaProposer(heads, tap).propose([FakeBranch(list(range(9)), 5)], [3]) == [[]]


def _eagle(rng: np.random.Generator) -> EagleLayer:
    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32)

    return EagleLayer(
        w(H, 2 * H), w(H), w(4 * 4, H), w(2 * 4, H), w(2 * 4, H), w(H, 4 * 4), w(24, H),
        w(24, H), w(H, 24), np.ones(H, np.float32), 4, 2, 4, 10000.0, 1e-5, _head(rng),
    )  # fmt: skip


def test_eagle_incremental_drafts_equal_fresh_ones() -> None:
    rng = np.random.default_rng(1)
    layer = _eagle(rng)
    table = rng.normal(size=(V, H)).astype(np.float32)

    def embed(ids: Any) -> np.ndarray:
        return table[np.asarray(ids)]

    hidden = rng.normal(size=(60, H)).astype(np.float32)
    tap = HiddenTap(H, keep=64)
    tokens = [int(t) for t in rng.integers(0, V, size=61)]
    kept = EagleProposer(layer, tap, embed, window=64)
    branch = FakeBranch(tokens[:20], seq_id=3)
    tap.record(3, 0, hidden[:19])
    for n in (20, 21, 24, 25, 31):  # the branch grows by 1-6 tokens between drafts
        branch.tokens = tokens[:n]
        tap.record(3, 0, hidden[: n - 1])
        (got,) = kept.propose([branch], [4])
        (fresh,) = EagleProposer(layer, tap, embed, window=64).propose(
            [FakeBranch(tokens[:n], seq_id=3)], [4]
        )
        assert got == fresh and len(got) == 4
    # the first draft is the layer's guess at the last cached position, from the full context
    n = 31
    z = layer.inputs(embed(tokens[1:n]), hidden[: n - 1])
    empty = np.zeros((0, 2, 4), np.float32)
    f, k, v = layer.forward(z, np.arange(n - 1), empty, empty)
    assert got[0] == int(layer.head.argmax(f[-1]))
    # float32 throughout: a float64 scalar once promoted every later matmul (7x slower)
    assert f.dtype == k.dtype == v.dtype == np.float32


def test_eagle_without_the_last_hidden_state_does_not_draft() -> None:
    rng = np.random.default_rng(2)
    tap = HiddenTap(H, keep=8)
    tap.record(1, 0, rng.normal(size=(4, H)).astype(np.float32))
    proposer = EagleProposer(_eagle(rng), tap, lambda ids: np.zeros((len(ids), H)), window=8)
    assert proposer.propose([FakeBranch(list(range(7)), 1)], [3]) == [[]]


def test_heads_files_round_trip_and_are_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(H, H)).astype(np.float32)
    target = {"name": "tiny", "hidden_size": H, "vocab_size": V, "num_hidden_layers": 2}
    config = {"kind": "medusa", "num_heads": 1, "target": target}
    vocab = np.arange(10, dtype=np.int32)
    write_heads(tmp_path / "m", config, {"medusa_head.0.0.linear.weight": w, "draft_vocab": vocab})
    got_config, tensors = read_heads(tmp_path / "m", "medusa")
    assert got_config == config
    assert tensors["draft_vocab"].dtype == np.int32
    assert tensors["draft_vocab"].tolist() == list(range(10))
    np.testing.assert_allclose(tensors["medusa_head.0.0.linear.weight"], w, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="not eagle"):
        read_heads(tmp_path / "m", "eagle")
    with pytest.raises(ConfigError, match="cannot read"):
        read_heads(tmp_path / "missing", "medusa")
    assert find_shipped("medusa", Shape(), root=tmp_path) == tmp_path / "m"
    assert find_shipped("eagle", Shape(), root=tmp_path) is None
    other = Shape(hidden_size=32)
    assert find_shipped("medusa", other, root=tmp_path) is None
    with pytest.raises(ConfigError, match="trained for tiny"):
        check_target(tmp_path / "m", config, other)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_shipped_heads_are_for_the_default_model(kind: str) -> None:
    smollm2 = Shape(hidden_size=576, vocab_size=49152, num_hidden_layers=30)
    path = find_shipped(kind, smollm2)
    assert path is not None and path.parent == SHIPPED
    config, tensors = read_heads(path, kind)
    assert config["target"]["name"] == "SmolLM2-135M-Instruct"
    vocab = tensors["draft_vocab"]
    assert len(vocab) == config["draft_vocab_size"] and np.all(np.diff(vocab) > 0)
    assert 0 <= vocab.min() and vocab.max() < 49152
    assert find_shipped(kind, Shape()) is None


def test_heads_with_wrong_shapes_are_refused_at_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    config = {"kind": "eagle", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
              "intermediate_size": 24, "rope_theta": 1e4, "rms_norm_eps": 1e-5}  # fmt: skip
    layer = _eagle(rng)
    a, m = "layers.0.self_attn.", "layers.0.mlp."
    tensors = {
        "fc.weight": layer.fc_w, "fc.bias": layer.fc_b, a + "q_proj.weight": layer.wq,
        a + "k_proj.weight": layer.wk, a + "v_proj.weight": layer.wv,
        a + "o_proj.weight": layer.wo, m + "gate_proj.weight": layer.gate,
        m + "up_proj.weight": layer.up, m + "down_proj.weight": layer.down,
        "layers.0.post_attention_layernorm.weight": layer.post_norm,
        "draft_vocab": np.arange(5, dtype=np.int32),
    }  # fmt: skip
    check_shapes(tmp_path, "eagle", config, tensors, H, V)  # all as expected
    with pytest.raises(ConfigError, match=r"fc.weight is shaped \(16, 16\), expected \(16, 32\)"):
        check_shapes(tmp_path, "eagle", config, {**tensors, "fc.weight": layer.fc_w[:, :H]}, H, V)
    with pytest.raises(ConfigError, match=r"up_proj\.weight is missing"):
        check_shapes(tmp_path, "eagle", config,
                     {k: v for k, v in tensors.items() if "up_proj" not in k}, H, V)  # fmt: skip
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        check_shapes(tmp_path, "eagle", config, {**tensors, "draft_vocab": np.array([V])}, H, V)
    with pytest.raises(ConfigError, match="lacks 'head_dim'"):
        check_shapes(tmp_path, "eagle", {k: v for k, v in config.items() if k != "head_dim"},
                     tensors, H, V)  # fmt: skip
    with pytest.raises(ConfigError, match="no medusa_head"):
        check_shapes(tmp_path, "medusa", {}, {"draft_vocab": np.arange(3)}, H, V)
