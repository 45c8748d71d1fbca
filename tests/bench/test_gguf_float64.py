"""bench/gguf_float64.py: the float64 model of a GGUF file computes the model mlctrio computes.

The demo `tiny` model (a llama) converted by bench/to_gguf.py: in F32, float64's log-probabilities
at every position equal mlctrio's numpy reference run on the original HF checkpoint (unpermuted
Q/K, HF's rotate-half RoPE), which checks the float64 model's reading of the file's permuted Q/K
rows with ggml's adjacent-pair RoPE; in Q8_0, they equal the reference run on the same file as
mlctrio loads it. Both to float32 rounding (the reference computes in float32: ~2e-7 apart).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the bench extra (pip install gguf) is not installed")

from bench.gguf_float64 import Float64Model, float64_checks, log_softmax
from bench.to_gguf import convert
from mlctrio.models.artifact import load_mlc_named, open_artifact
from mlctrio.models.demo import ensure_demo_model
from mlctrio.models.reference import ReferenceLlama

IDS = [1, 17, 305, 42, 999, 7, 7, 123, 64, 500, 2, 88]


def _reference_logprobs(source: Path) -> np.ndarray:
    art = open_artifact(source, activations="f32")
    ref = ReferenceLlama(art.config, load_mlc_named(art), art.quantization)
    cache = ref.new_cache()
    cache.add_sequence(0)
    return log_softmax(ref.forward(cache, 0, IDS).astype(np.float64))


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_float64_model_matches_the_reference(tmp_path: Path, outtype: str) -> None:
    model_dir = ensure_demo_model("tiny")
    path = convert(model_dir, tmp_path / f"tiny-{outtype}.gguf", outtype, verbose=False)
    model = Float64Model(path)
    ours = model.logprobs(IDS, last_only=False)
    expected = _reference_logprobs(model_dir if outtype == "f32" else path)
    assert ours.shape == expected.shape == (len(IDS), 1000)
    np.testing.assert_allclose(ours, expected, atol=1e-5)  # ~2e-7; rotate-half RoPE: 7e-3
    np.testing.assert_allclose(model.logprobs(IDS), ours[-1], atol=1e-12)

    # gguf_parity --float64: which server's token float64 prefers at a divergence
    top2 = np.argsort(-ours[3])[:2]  # after IDS[:4]
    vocab = [f"t{i}" for i in range(1000)]
    ours_ids, theirs_ids = [*IDS[2:4], int(top2[1])], [*IDS[2:4], int(top2[0])]
    check = SimpleNamespace(
        prompt="p",
        step=2,
        mlctrio=[vocab[i] for i in ours_ids],
        llama=[vocab[i] for i in theirs_ids],
    )
    (verdict,) = float64_checks(path, [check], [(IDS[:2], theirs_ids)], vocab)
    assert verdict.picks == "llama.cpp" and verdict.float64_top == vocab[top2[0]]
    assert verdict.gap == pytest.approx(ours[3, top2[1]] - ours[3, top2[0]])


def test_float64_finds_ids_that_part_under_the_same_text(tmp_path: Path) -> None:
    """Two ids with one text (partial UTF-8 characters all read '\ufffd'): the texts agree, but
    llama-server's id is not float64's choice; that step is the divergence judged."""
    path = convert(ensure_demo_model("tiny"), tmp_path / "tiny.gguf", "f32", verbose=False)
    lp = Float64Model(path).logprobs(IDS[:4])
    first, second = (int(t) for t in np.argsort(-lp)[:2])
    vocab = [f"t{i}" for i in range(1000)]
    vocab[first] = vocab[second] = "\ufffd"
    theirs = [*IDS[2:4], second, *IDS[5:8]]
    texts = [vocab[i] for i in theirs]
    for mlctrio, text_step in ((texts, 6), ([*texts[:5], "t999"], 5)):
        check = SimpleNamespace(
            prompt="p", step=None if text_step == 6 else 5, mlctrio=mlctrio, llama=texts
        )
        (verdict,) = float64_checks(path, [check], [(IDS[:2], theirs)], vocab)
        assert (verdict.step, verdict.text_step, verdict.picks) == (2, text_step, "mlctrio")
        assert verdict.ambiguous and verdict.gap == pytest.approx(lp[first] - lp[second])
