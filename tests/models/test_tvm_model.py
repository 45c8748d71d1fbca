"""The compiled Llama + TVMRunner against the numpy reference, and the compile cache.

Each (config, quantization) is compiled once into the tests' library folder (`lib_cache_dir`,
tests/conftest.py), keyed by the compile-cache hash, so reruns load in milliseconds.

Tolerances: every quantization keeps float32 activations and a float32 KV cache on the CPU, and the
reference multiplies by the same *effective* weights (dequantised q4 / f16-rounded q0f16). The only
differences left are float32 summation order (TVM vectorises with fast-math reassoc) and the
attention kernel's online softmax: ~2e-6 on logits of magnitude ~3. ATOL = 1e-4 is 50x that and
still far below any real bug (a wrong position, page or RoPE angle moves logits by >1e-2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import pytest
from tvm.target import Target

from mlctrio.errors import EngineError
from mlctrio.models.compile import CompiledModel, compile_model, host_cpu_target
from mlctrio.models.llama import has_vnni
from mlctrio.models.llama_config import TINY, LlamaConfig
from mlctrio.models.quantization import get_quantization
from mlctrio.models.reference import ReferenceLlama, RefKVCache
from mlctrio.models.weights import hf_to_mlc, mlc_to_params, param_infos, random_hf_weights
from mlctrio.runtime.tvm_runner import TVMRunner

pytestmark = pytest.mark.slow

ATOL = 1e-4
# Qwen2-like variant: tied embeddings, qkv bias, llama3 RoPE scaling, a partial q4 group (K=80).
# Vocab 320 (20 tiles of 16): the tied table takes the tile16 layout, read by both the embedding
# lookup and the lm_head (TINY's 300 keeps the untiled lm_head path covered).
TINY_QWEN = attrs.evolve(
    TINY,
    vocab_size=320,
    tie_word_embeddings=True,
    attention_bias=True,
    intermediate_size=80,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    rope_theta=500000.0,
)
CONFIGS = {"tiny": TINY, "tiny_qwen": TINY_QWEN}
_TARGET_KEYS = ("kind", "mcpu", "num-cores", "fast-math-reassoc", "fast-math-contract")


@pytest.fixture(scope="session")
def lib_dir(lib_cache_dir: Path) -> Path:
    return lib_cache_dir


@pytest.fixture(scope="session")
def compiled(lib_dir: Path) -> Callable[[str, str], CompiledModel]:
    memo: dict[tuple[str, str], CompiledModel] = {}

    def _get(config_name: str, quant: str) -> CompiledModel:
        if (config_name, quant) not in memo:
            memo[config_name, quant] = compile_model(CONFIGS[config_name], quant, cache_dir=lib_dir)
        return memo[config_name, quant]

    return _get


@attrs.define
class Pair:
    """A TVMRunner and the reference, driven in lock step."""

    runner: TVMRunner
    ref: ReferenceLlama
    cache: RefKVCache

    def add(self, *seq_ids: int) -> None:
        for s in seq_ids:
            self.runner.add_sequence(s)
            self.cache.add_sequence(s)

    def step_and_check(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        got = self.runner.step(batch)
        want = np.stack([self.ref.forward(self.cache, s, toks)[-1] for s, toks in batch])
        assert got.shape == (len(batch), self.runner.vocab_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        return got


def make_pair(
    cm: CompiledModel, config: LlamaConfig, seed: int = 0, target: Target | None = None
) -> Pair:
    mlc = hf_to_mlc(config, random_hf_weights(config, seed=seed), cm.quantization)
    runner = TVMRunner(
        cm.lib_path,
        mlc_to_params(mlc, cm.params),
        config,
        max_num_sequence=8,
        max_total_seq_length=2048,
        prefill_chunk_size=256,
    )
    int8 = has_vnni(target or host_cpu_target())  # what compile_model built the library for
    ref = ReferenceLlama(config, mlc, get_quantization(cm.quantization), int8=int8)
    return Pair(runner, ref, ref.new_cache())


def toks(rng: np.random.Generator, n: int, vocab: int = TINY.vocab_size) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


@pytest.mark.parametrize("quant", ["q0f32", "q0f16", "q4f32_1", "q4f16_1"])
def test_single_prefill_then_decode(compiled, quant: str) -> None:
    pair = make_pair(compiled("tiny", quant), TINY)
    rng = np.random.default_rng(1)
    pair.add(0)
    pair.step_and_check([(0, toks(rng, 37))])
    for _ in range(3):
        pair.step_and_check([(0, toks(rng, 1))])
    assert pair.runner.sequence_length(0) == 40


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1"])
def test_ragged_batch_mixed_prefill_and_decode(compiled, quant: str) -> None:
    pair = make_pair(compiled("tiny", quant), TINY)
    rng = np.random.default_rng(2)
    pair.add(0, 1, 2)
    # Ragged lengths crossing 16-token page boundaries.
    pair.step_and_check([(0, toks(rng, 5)), (1, toks(rng, 17)), (2, toks(rng, 33))])
    # Mixed batch: a decode, a new sequence's prefill and a continued prefill chunk.
    pair.add(3)
    pair.step_and_check([(0, toks(rng, 1)), (3, toks(rng, 20)), (1, toks(rng, 15))])
    for _ in range(2):  # pure decode (batch_decode path), order differs from insertion order
        pair.step_and_check([(s, toks(rng, 1)) for s in (3, 1, 0, 2)])
    assert [pair.runner.sequence_length(s) for s in range(4)] == [8, 34, 35, 22]


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1"])
def test_decode_paths_pad_odd_batches_and_batch_one(compiled, quant: str) -> None:
    """batch_decode pads the batch to its row block (4): odd batches must still be exact, and the
    static batch-1 `decode` and batch_decode at batch 1 must agree with the reference."""
    pair = make_pair(compiled("tiny", quant), TINY)
    rng = np.random.default_rng(4)
    pair.add(0, 1, 2)
    pair.step_and_check([(s, toks(rng, 9 + s)) for s in (0, 1, 2)])
    pair.step_and_check([(s, toks(rng, 1)) for s in (2, 0, 1)])  # batch 3: padded to 4
    assert pair.runner._f_steps["decode"] is not None  # this library exports the batch-1 function
    pair.step_and_check([(1, toks(rng, 1))])  # batch 1 through `decode`
    pair.runner._f_steps["decode"] = None  # as with a library compiled before it existed
    pair.step_and_check([(1, toks(rng, 1))])  # batch 1 through batch_decode (padded to 2)


def test_row_block_forms_match_the_reference_and_batch_decode(compiled) -> None:
    """With float activations a group-quantized library also exports batch_decode_r2 and _r8
    (row blocks of 2 and 8 in the group kernels); the runner takes r2 for steps of 2 rows, r8
    for more than 4, batch_decode (blocks of 4) for 3-4. Each step matches the reference, and
    batch_decode's own blocks bit for bit. A float library, which has no group kernel, exports
    no such forms."""
    plain = make_pair(compiled("tiny", "q0f32"), TINY).runner
    assert plain._f_steps["batch_decode_r2"] is None and plain._f_steps["batch_decode_r8"] is None
    cm = compiled("tiny", "q4f32_1;act=f32")
    mlc = hf_to_mlc(TINY, random_hf_weights(TINY, seed=5), cm.quantization)
    runner = TVMRunner(
        cm.lib_path, mlc_to_params(mlc, cm.params), TINY,
        max_num_sequence=8, max_total_seq_length=2048, prefill_chunk_size=256,
    )  # fmt: skip
    ref = ReferenceLlama(TINY, mlc, cm.quantization, int8=False)
    pair = Pair(runner, ref, ref.new_cache())
    forms = {name: runner._f_steps[name] for name in ("batch_decode_r2", "batch_decode_r8")}
    assert all(forms.values())
    calls: list[str] = []

    def _counting() -> None:
        for name, f in forms.items():
            runner._f_steps[name] = lambda *a, name=name, f=f: calls.append(name) or f(*a)

    _counting()
    rng = np.random.default_rng(6)
    pair.add(*range(8))
    pair.step_and_check([(s, toks(rng, 3 + s)) for s in range(8)])
    for n in (2, 5, 8, 3):
        batch = [(s, toks(rng, 1)) for s in range(n)]
        got = pair.step_and_check(batch)
        for s, _ in batch:
            runner.popn(s, 1)
        for name in forms:  # batch_decode, blocks of 4
            runner._f_steps[name] = None
        narrow = runner.step(batch)
        _counting()
        np.testing.assert_array_equal(got, narrow)
    assert calls == ["batch_decode_r2", "batch_decode_r8", "batch_decode_r8"]  # 3 rows: blocks of 4


def test_hidden_row_block_forms_match_the_plain_ones(compiled, lib_dir: Path) -> None:
    """The hidden-output library (medusa/eagle) has the row-block forms too: with the tap on,
    steps of 2 and 5 rows go through batch_decode_hidden_r2 / _r8 and give the plain library's
    logits bit for bit, and the hidden states the runner's `hidden` gives for those positions."""
    cm = compiled("tiny", "q4f32_1;act=f32")
    tapped_cm = compile_model(TINY.with_hidden_outputs(), cm.quantization, cache_dir=lib_dir)
    mlc = hf_to_mlc(TINY, random_hf_weights(TINY, seed=7), cm.quantization)
    runners = [
        TVMRunner(
            c.lib_path, mlc_to_params(mlc, c.params), config,
            max_num_sequence=8, max_total_seq_length=2048, prefill_chunk_size=256,
        )
        for c, config in ((cm, TINY), (tapped_cm, TINY.with_hidden_outputs()))
    ]  # fmt: skip
    plain, tapped = runners
    tap = tapped.enable_hidden_tap(64)
    calls: list[str] = []
    for name in ("batch_decode_r2", "batch_decode_r8"):
        f = tapped._f_tapped[name]
        assert f is not None
        tapped._f_tapped[name] = lambda *a, name=name, f=f: calls.append(name) or f(*a)
    rng = np.random.default_rng(8)
    for r in runners:
        for s in range(5):
            r.add_sequence(s)
    first = [(s, toks(rng, 4 + s)) for s in range(5)]
    for r in runners:
        r.step(first)
    tokens0 = list(first[0][1])
    for n in (2, 5):
        batch = [(s, toks(rng, 1)) for s in range(n)]
        np.testing.assert_array_equal(tapped.step(batch), plain.step(batch))
        tokens0 += batch[0][1]
    assert calls == ["batch_decode_r2", "batch_decode_r8"]
    # sequence 0's 6 positions (its last 2 from those two steps) against a fresh whole pass
    plain.add_sequence(7)
    want = plain.hidden([(7, tokens0)])
    got = tap.rows(0, 0, len(tokens0))
    assert got is not None and want.shape == got.shape == (6, TINY.hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_q4_without_vnni_runs_the_float_kernels(lib_dir: Path) -> None:
    """On a CPU without AVX512-VNNI the q4 layers keep float activations: the tile16 kernels
    (dequantise-per-tile for prefill, the group-scale kernel for decode) must be exact too."""
    attrs_ = dict(host_cpu_target().export())
    attrs_["mcpu"] = "x86-64-v3"  # AVX2, no VNNI: runs on this machine, builds the fallback
    no_vnni = Target({k: v for k, v in attrs_.items() if k in _TARGET_KEYS})
    assert not has_vnni(no_vnni)
    cm = compile_model(TINY_QWEN, "q4f32_1", target=no_vnni, cache_dir=lib_dir)
    pair = make_pair(cm, TINY_QWEN, seed=8, target=no_vnni)
    rng = np.random.default_rng(9)
    pair.add(0, 1, 2)
    pair.step_and_check([(s, toks(rng, 7 + 5 * s)) for s in range(3)])
    pair.step_and_check([(s, toks(rng, 1)) for s in (1, 2, 0)])  # batch_decode, padded rows
    pair.step_and_check([(2, toks(rng, 1))])  # `decode`, one row


def test_fork_full_and_mid_sequence(compiled) -> None:
    pair = make_pair(compiled("tiny", "q0f32"), TINY)
    rng = np.random.default_rng(3)
    pair.add(0)
    pair.step_and_check([(0, toks(rng, 21))])
    for child, pos in ((1, -1), (2, 16), (3, 10)):  # end, page boundary, mid-page
        pair.runner.fork_sequence(0, child, pos)
        pair.cache.fork_sequence(0, child, pos)
    assert [pair.runner.sequence_length(s) for s in range(4)] == [21, 21, 16, 10]
    # Children diverge from the parent (and from each other) from here on.
    for _ in range(2):
        pair.step_and_check([(s, toks(rng, 1 + s)) for s in range(4)])


def test_popn_then_continue(compiled) -> None:
    pair = make_pair(compiled("tiny", "q0f32"), TINY)
    rng = np.random.default_rng(4)
    pair.add(0, 1)
    pair.step_and_check([(0, toks(rng, 30)), (1, toks(rng, 9))])
    pair.runner.popn(0, 7)
    pair.cache.popn(0, 7)
    assert pair.runner.sequence_length(0) == 23
    pair.step_and_check([(0, toks(rng, 3)), (1, toks(rng, 1))])
    pair.step_and_check([(0, toks(rng, 1)), (1, toks(rng, 1))])


def test_verify_returns_every_position(compiled) -> None:
    pair = make_pair(compiled("tiny", "q0f32"), TINY)
    rng = np.random.default_rng(5)
    pair.add(0, 1)
    pair.step_and_check([(0, toks(rng, 12)), (1, toks(rng, 3))])
    draft = [(0, toks(rng, 4)), (1, toks(rng, 2))]
    got = pair.runner.verify(draft)
    want = np.concatenate([pair.ref.forward(pair.cache, s, t) for s, t in draft])
    assert got.shape == (6, TINY.vocab_size)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_hidden_returns_the_final_hidden_state_at_every_position(compiled) -> None:
    """What embeddings pool: the normed hidden states, beside a sequence that keeps decoding."""
    pair = make_pair(compiled("tiny", "q0f32"), TINY)
    rng = np.random.default_rng(6)
    pair.add(0, 1)
    pair.step_and_check([(0, toks(rng, 9))])
    chunks = [(1, toks(rng, 5)), (0, toks(rng, 1))]
    got = pair.runner.hidden(chunks)
    want = np.concatenate([pair.ref.forward(pair.cache, s, t, hidden=True) for s, t in chunks])
    assert got.shape == (6, TINY.hidden_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    pair.step_and_check([(0, toks(rng, 1)), (1, toks(rng, 2))])  # the cache stayed in step


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1"])
def test_tied_bias_llama3_rope_variant(compiled, quant: str) -> None:
    pair = make_pair(compiled("tiny_qwen", quant), TINY_QWEN, seed=7)
    rng = np.random.default_rng(6)
    pair.add(0, 1)
    # Positions well past original_max_position_embeddings=64 exercise the llama3 scaling.
    pair.step_and_check([(0, toks(rng, 90)), (1, toks(rng, 3))])
    pair.step_and_check([(0, toks(rng, 1)), (1, toks(rng, 1))])


def test_page_accounting_and_release(compiled) -> None:
    runner = make_pair(compiled("tiny", "q0f32"), TINY).runner
    total = runner.total_pages()
    assert runner.free_pages() == total == 2048 // 16 + 1  # the KV cache adds one spare page
    runner.add_sequence(0)
    runner.step([(0, list(range(33)))])
    assert total - runner.free_pages() == 3  # ceil(33 / 16)
    runner.fork_sequence(0, 1, 32)  # shares the two full pages
    runner.step([(1, [1])])
    assert total - runner.free_pages() == 4
    runner.remove_sequence(0)
    runner.remove_sequence(1)
    assert runner.free_pages() == total


def test_invalid_batches_raise_before_reaching_tvm(compiled) -> None:
    runner = make_pair(compiled("tiny", "q0f32"), TINY).runner
    runner.add_sequence(0)
    bad = {
        "unknown": [(5, [1])],
        "oov": [(0, [TINY.vocab_size])],
        "negative": [(0, [-1])],
        "duplicate": [(0, [1]), (0, [2])],
        "empty entry": [(0, [])],
        "over chunk": [(0, [1] * 257)],
    }
    for name, batch in bad.items():
        with pytest.raises(EngineError):
            runner.step(batch)
        assert runner.sequence_length(0) == 0, name
    with pytest.raises(EngineError):
        runner.add_sequence(0)
    with pytest.raises(EngineError):
        runner.popn(0, 1)
    with pytest.raises(EngineError):
        runner.fork_sequence(0, 1, 5)  # past the parent's length
    assert runner.step([(0, [1, 2])]).shape == (1, TINY.vocab_size)  # still usable


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1"])
def test_param_infos_match_the_compiled_module(compiled, quant: str) -> None:
    # weights.param_infos builds the layout without compiling; it must equal the export order.
    assert param_infos(TINY_QWEN, quant) == compiled("tiny_qwen", quant).params


def test_compile_cache_hit_does_not_recompile(tmp_path: Path, caplog) -> None:
    small = attrs.evolve(TINY, num_hidden_layers=1, vocab_size=64)
    with caplog.at_level(logging.INFO, logger="mlctrio.models.compile"):
        first = compile_model(small, "q0f32", cache_dir=tmp_path)
        mtime = first.lib_path.stat().st_mtime_ns
        second = compile_model(small, "q0f32", cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert second.lib_path == first.lib_path and second.lib_path.stat().st_mtime_ns == mtime
    assert second.params == first.params
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cache miss" in m for m in messages) == 1
    assert sum("cache hit" in m for m in messages) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1
