"""`mlctrio convert-weight FILE.gguf`: the MLC artifact serves what the GGUF file serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlctrio.cli import main
from mlctrio.models.artifact import load_mlc_named, open_artifact
from mlctrio.runtime.chat_template import load_chat_template
from mlctrio.runtime.model_loader import tokenizer_and_template
from mlctrio.runtime.tokenizer import load_tokenizer

TEXTS = (
    "def main():\n    return 42  # the answer",
    "Ünïcödé, 日本語, emoji 🙂👍🏽 and  three   spaces\n\n\ttabs",
    "<|im_start|>user\nhi<|im_end|>\n12345 numbers",
)


@pytest.fixture(scope="module")
def exported(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlc") / "smollm2"
    assert main(["convert-weight", str(smollm2_gguf), "-o", str(out)]) == 0
    return out


def test_weights_and_scheme_survive(smollm2_gguf: Path, exported: Path) -> None:
    gguf_art, mlc_art = open_artifact(smollm2_gguf), open_artifact(exported)
    assert mlc_art.format == "mlc" and mlc_art.quantization == gguf_art.quantization
    assert mlc_art.config == gguf_art.config
    want, got = load_mlc_named(gguf_art), load_mlc_named(mlc_art)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_tokenizer_and_template_survive(smollm2_gguf: Path, exported: Path) -> None:
    tok, template = tokenizer_and_template(open_artifact(smollm2_gguf))
    mlc_tok = load_tokenizer(exported)
    for text in TEXTS:
        assert mlc_tok.encode(text) == tok.encode(text), text
    assert (mlc_tok.bos_token_id, mlc_tok.eos_token_ids) == (tok.bos_token_id, tok.eos_token_ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert load_chat_template(exported, mlc_tok).render(messages) == template.render(messages)


def test_quantization_is_refused_for_gguf(smollm2_gguf: Path, tmp_path: Path) -> None:
    argv = ["convert-weight", str(smollm2_gguf), "--quantization", "q4f32_1", "-o", str(tmp_path)]
    assert main(argv) != 0


def test_cli_choices_mirror_the_model_layer() -> None:
    """cli.py keeps its own copies (it must not import tvm at startup): they must agree."""
    from mlctrio import cli
    from mlctrio.models import quantization

    assert cli.HF_QUANTIZATIONS == quantization.HF_QUANTIZATIONS
    assert cli.ACTIVATIONS == quantization.ACTIVATIONS
