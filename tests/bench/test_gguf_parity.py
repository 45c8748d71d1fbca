"""bench/to_gguf.py: llama.cpp runs the same model as mlctrio.

The parity test converts the demo `tiny` model to an f32 GGUF, serves it with llama-server and
checks that llama.cpp's greedy tokens equal mlctrio's for a few prompts, and that llama.cpp's
tokenizer splits text exactly like mlctrio's. It is skipped (the only skip here) when llama-server
is not built: `python bench/llama_cpp.py` builds it once into ~/.cache/mlctrio/llama.cpp.

The SmolLM2 test runs part (a) of bench/gguf_parity.py, tokenization parity, on the real
SmolLM2-135M-Instruct Q4_1 file: mlctrio's tokenizer built from the file (what `mlctrio serve
FILE.gguf` and its /tokenize route use) against llama-server's /tokenize on the same file, for
every text of gguf_parity.TOKENIZE_TEXTS (code, unicode, CJK, emoji, whitespace, special tokens).
It is skipped with the same rule.

The file-level tests (round trip, Q/K permutation against RoPE, pre-tokenizer names) need only the
`gguf` package.

Random-weight models have near-flat logits (the demo's top tokens are ~0.01 nats apart), so a
greedy step of two f32 implementations may legitimately pick different tokens when two logits are
within float noise. The parity test does not loosen the comparison for that: it compares the first
16 tokens exactly, and if they diverge, it requires the diverging step to be a near-tie *by the
logits of both engines* (and the tokens before it to match).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the bench extra (pip install gguf) is not installed")

from bench import llama_cpp  # noqa: E402
from bench import llama_server as run  # noqa: E402
from bench.to_gguf import convert, permute_qk, pre_tokenizer_name  # noqa: E402
from mlctrio.models.demo import ensure_demo_model  # noqa: E402
from mlctrio.models.formats import read_safetensors  # noqa: E402

N_TOKENS = 16
TOP = 5
# Two logits this close (in nats) are a tie to f32 arithmetic summed in a different order; the
# demo model's real gaps between ranks are ~1e-2, three orders of magnitude above.
NEAR_TIE_NATS = 1e-4
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42  # the answer",
    "Hello, world! Numbers 12345 and symbols: @#$%^&*()",
    "  leading spaces, trailing\ttabs\t and émojis 🙂 über",
)


# -- the GGUF file alone ------------------------------------------------------------------------


def _field(reader: object, key: str) -> object:
    return reader.fields[key].contents()  # type: ignore[attr-defined]


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_round_trip(tmp_path: Path, outtype: str) -> None:
    """Every tensor reads back (dequantized) close to the checkpoint, Q/K permuted, with the
    tokenizer metadata llama.cpp needs."""
    model_dir = ensure_demo_model("tiny")
    out = convert(model_dir, tmp_path / f"tiny-{outtype}.gguf", outtype, verbose=False)
    reader = gguf.GGUFReader(out)
    hf = read_safetensors(model_dir / "model.safetensors")
    cfg = json.loads((model_dir / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(hf)
    # q4_0's error is up to half a step of max|w|/8 per block: ~0.1 of the weights' std 0.02 * 4
    tol = {"f32": 0.0, "f16": 1e-4, "q8_0": 1e-3, "q4_0": 8e-3}[outtype]
    for hf_name, expected in hf.items():
        t = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        if hf_name.endswith("q_proj.weight"):
            expected = permute_qk(expected, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            expected = permute_qk(expected, cfg["num_key_value_heads"])
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=hf_name)
        if expected.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, hf_name

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]  # type: ignore[arg-type]
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())  # type: ignore[index]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])  # type: ignore[arg-type]
    types = _field(reader, "tokenizer.ggml.token_type")
    for added in tok["added_tokens"]:
        assert types[added["id"]] == gguf.TokenType.CONTROL  # type: ignore[index]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok["added_tokens"][2]["id"]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "llama.rope.freq_base") == cfg["rope_theta"]


def _rope_hf(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """HF Llama RoPE of one head's vector: rotate_half pairs dim i with dim i + d/2."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[: d // 2], x[d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin])


def _rope_ggml_normal(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """ggml's LLAMA_ROPE_TYPE_NORM: rotates adjacent pairs (2i, 2i + 1) by the same angles."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_qk_permutation_turns_hf_rope_into_ggml_rope() -> None:
    """Attention scores q.k after RoPE are the same for (HF weights, HF RoPE) and (permuted
    weights, ggml RoPE): the permutation is what makes llama.cpp compute the HF model."""
    rng = np.random.default_rng(0)
    n_head, n_kv, d, hidden = 4, 2, 16, 64
    wq = rng.standard_normal((n_head * d, hidden))
    wk = rng.standard_normal((n_kv * d, hidden))
    x_q, x_k = rng.standard_normal(hidden), rng.standard_normal(hidden)
    q_hf, k_hf = (wq @ x_q).reshape(n_head, d), (wk @ x_k).reshape(n_kv, d)
    q_gg = (permute_qk(wq, n_head) @ x_q).reshape(n_head, d)
    k_gg = (permute_qk(wk, n_kv) @ x_k).reshape(n_kv, d)
    for h in range(n_head):
        kv = h // (n_head // n_kv)
        hf = _rope_hf(q_hf[h], 7) @ _rope_hf(k_hf[kv], 3)
        gg = _rope_ggml_normal(q_gg[h], 7) @ _rope_ggml_normal(k_gg[kv], 3)
        assert gg == pytest.approx(hf, rel=1e-10)
        # and without the permutation llama.cpp would compute something else
        wrong = _rope_ggml_normal(q_hf[h], 7) @ _rope_ggml_normal(k_hf[kv], 3)
        assert wrong != pytest.approx(hf, rel=1e-3)


def test_pre_tokenizer_names() -> None:
    byte_level = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    split = {"type": "Split", "pattern": {"Regex": "nope"}}
    unknown = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split]}}
    with pytest.raises(ValueError, match="--tokenizer-pre"):
        pre_tokenizer_name(unknown)


# -- llama-server against mlctrio ----------------------------------------------------------------


@contextlib.contextmanager
def _tiny_llama_server(
    tmp_path_factory: pytest.TempPathFactory, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """llama-server on the demo tiny model converted to an f32 GGUF (skip when not built)."""
    binary = llama_cpp.find_llama_server()
    if binary is None:
        pytest.skip(
            "llama-server is not built: run `python bench/llama_cpp.py` once (builds llama.cpp "
            f"into {llama_cpp.cache_dir()}, ~15-30 min on 2 cores) or set $MLCTRIO_LLAMA_SERVER"
        )
    out = convert(
        "demo://tiny", tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32", verbose=False
    )
    with run.open_llama_server(
        out, binary=binary, threads=2, ctx_per_slot=512, extra=extra
    ) as server:
        yield server.url


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _tiny_llama_server(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def mlctrio_core() -> Iterator[tuple[object, object]]:
    from mlctrio.config import ServerConfig
    from mlctrio.runtime.model_loader import load_model

    core, info = load_model(ServerConfig(model="demo://tiny"))
    try:
        yield core, info.tokenizer
    finally:
        core.close()


def _mlctrio_greedy(core: object, ids: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """mlctrio's greedy tokens and, per step, {token id: logprob} of its top alternatives."""
    from mlctrio.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(
        max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=TOP
    )
    core.add_request(GenerationRequest(f"parity-{len(ids)}", tuple(ids), params))  # type: ignore[attr-defined]
    tokens: list[int] = []
    tops: list[dict[int, float]] = []
    while core.has_work():  # type: ignore[attr-defined]
        for output in core.step():  # type: ignore[attr-defined]
            assert output.error is None, output.error
            for delta in output.deltas:
                tokens += delta.token_ids
                for lp in delta.logprobs or ():
                    tops.append({t.token_id: t.logprob for t in lp.top_logprobs})
    return tokens, tops


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_cpp_greedy_matches_mlctrio(
    llama_server: str, mlctrio_core: tuple[object, object], prompt: str
) -> None:
    core, tokenizer = mlctrio_core
    ids = tokenizer.encode(prompt, add_special_tokens=False)  # type: ignore[attr-defined]
    # The GGUF tokenizer is the same tokenizer: same ids for the same text.
    assert run.tokenize(llama_server, prompt) == ids

    ours, our_tops = _mlctrio_greedy(core, ids)
    theirs = run.greedy_tokens(llama_server, ids, N_TOKENS, n_probs=TOP)
    assert len(ours) == len(theirs.tokens) == N_TOKENS
    if ours == theirs.tokens:
        return
    # A divergence must be a near-tie in *both* engines' logits at the first differing step;
    # everything after it is a different continuation and is not compared.
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs.tokens, strict=True)) if a != b)
    a, b = ours[step], theirs.tokens[step]
    their_top = dict(theirs.top_logprobs[step])
    detail = (
        f"prompt {prompt!r}: first difference at step {step}: mlctrio {a}, llama.cpp {b}\n"
        f"  mlctrio top logprobs:   {our_tops[step]}\n  llama.cpp top logprobs: {their_top}"
    )
    assert b in our_tops[step] and a in their_top, detail
    assert abs(our_tops[step][a] - our_tops[step][b]) < NEAR_TIE_NATS, detail
    assert abs(their_top[a] - their_top[b]) < NEAR_TIE_NATS, detail
    print(f"near-tie accepted: {detail}")


def test_a_cached_llama_server_built_with_other_flags_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build from before a flag change (e.g. one with llama.cpp's crashing AMX kernels) is
    rebuilt, not reused; a half-linked binary without the marker is never used."""
    monkeypatch.setenv("MLCTRIO_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLCTRIO_LLAMA_SERVER", raising=False)
    binary = llama_cpp.cache_dir() / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert llama_cpp.find_llama_server() is None  # no build.ok marker
    marker = llama_cpp.cache_dir() / "build.ok"
    old_flags = [f for f in llama_cpp.CMAKE_FLAGS if "amx" not in f]
    marker.write_text(json.dumps({"flags": old_flags}))
    assert llama_cpp.find_llama_server() is None
    marker.write_text(json.dumps({"flags": list(llama_cpp.CMAKE_FLAGS)}))
    assert llama_cpp.find_llama_server() == binary


@pytest.fixture(scope="module")
def llama_embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _tiny_llama_server(tmp_path_factory, ("--embeddings", "--pooling", "mean")) as url:
        yield url


def test_embeddings_match_llama_server(
    llama_embedding_server: str, mlctrio_core: tuple[object, object]
) -> None:
    """Mean-pooled, L2-normalised final hidden states: llama.cpp's --pooling mean and
    mlctrio's embedding requests agree on the same f32 model and token ids."""
    import httpx

    from mlctrio.engine.types import GenerationRequest, SamplingParams

    core, _ = mlctrio_core
    for k, prompt in enumerate(PROMPTS):
        ids = run.tokenize(llama_embedding_server, prompt)
        body = {"input": ids, "model": "tiny"}
        r = httpx.post(f"{llama_embedding_server}/v1/embeddings", json=body, timeout=120)
        theirs = np.asarray(r.json()["data"][0]["embedding"])
        spec = GenerationRequest(
            f"emb-{k}", tuple(ids), SamplingParams(max_tokens=1), pooling="mean"
        )
        core.add_request(spec)  # type: ignore[attr-defined]
        ours: np.ndarray | None = None
        while core.has_work():  # type: ignore[attr-defined]
            for output in core.step():  # type: ignore[attr-defined]
                if output.embedding is not None:
                    ours = np.asarray(output.embedding)
        assert ours is not None and theirs.shape == ours.shape
        ours = ours / np.linalg.norm(ours)
        assert float(ours @ theirs) > 0.99999, prompt
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


# -- SmolLM2's GGUF: bench/gguf_parity.py's tokenization parity ---------------------------------


@pytest.fixture(scope="module")
def smollm2_llama_server(smollm2_gguf: Path) -> Iterator[str]:
    binary = llama_cpp.find_llama_server()
    if binary is None:
        pytest.skip(
            "llama-server is not built: run `python bench/llama_cpp.py` once (builds llama.cpp "
            f"into {llama_cpp.cache_dir()}, ~15-30 min on 2 cores) or set $MLCTRIO_LLAMA_SERVER"
        )
    with run.open_llama_server(smollm2_gguf, binary=binary, threads=2, ctx_per_slot=512) as server:
        yield server.url


def test_smollm2_tokenization_matches_llama_server(
    smollm2_gguf: Path, smollm2_llama_server: str
) -> None:
    from bench.gguf_parity import TOKENIZE_TEXTS, check_tokenization
    from mlctrio.models.gguf_file import GGUFModel
    from mlctrio.runtime.gguf_tokenizer import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFModel.open(smollm2_gguf).metadata)
    checks = check_tokenization(
        TOKENIZE_TEXTS,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        lambda text: run.tokenize(smollm2_llama_server, text),
    )
    bad = [c for c in checks if not c.ok]
    assert not bad, "\n".join(
        f"{c.text!r}: first difference at {c.first_difference}\n  mlctrio   {c.mlctrio}\n"
        f"  llama.cpp {c.llama}"
        for c in bad
    )
    # the special-token strings became single control tokens on both sides
    chat = next(c for c in checks if c.text.startswith("<|im_start|>user"))
    assert (
        len(chat.llama) == 10
        and chat.llama[0] == tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]
    )
