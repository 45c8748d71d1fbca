"""Choose the engine configuration from the mode, the model and the memory available (as MLC).

    interactive  max_num_sequence 1, total sequence length = the context window
    local        max_num_sequence 4, total sequence length = the context window (≤ memory)
    server       max_num_sequence up to 128, total sequence length = what memory allows

On the CPU `gpu_memory_utilization` is the fraction of *available* RAM that weights + KV cache +
workspace may take. `--overrides` beat the mode's choice; a setting that cannot fit fails at start
with a message that says by how much.

Several models (`--additional-models`) share one budget, measured once before the first loads:
`MemoryPlan` gives each model, in load order, what the models before it left (in server mode,
whose KV cache grows into all it is given, an equal share of it among the models still to load),
and a model that does not fit is refused with every model's numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs

from .config import EngineConfig, EngineOverrides, ServerConfig
from .errors import ConfigError

GIB = 1 << 30


@attrs.frozen
class ModelFootprint:
    """What the model needs, independent of the engine settings."""

    context_window_size: int
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0  # K and V, all layers, float32 on the CPU
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    #: Tokens a sliding sequence keeps when the KV cache releases what leaves the window
    #: (LlamaConfig.kv_window); None: a sequence holds every position.
    kv_window: int | None = None


@attrs.frozen
class MemoryEstimate:
    weight_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes

    def describe(self) -> str:
        return (
            f"weights {self.weight_bytes / GIB:.2f} GiB + KV cache {self.kv_cache_bytes / GIB:.2f}"
            f" GiB + workspace {self.workspace_bytes / GIB:.2f} GiB = "
            f"{self.total_bytes / GIB:.2f} GiB of a {self.budget_bytes / GIB:.2f} GiB budget"
        )


class DoesNotFit(ConfigError):
    """A model that does not fit its budget; `needed` is the least it would take."""

    def __init__(self, message: str, needed: MemoryEstimate) -> None:
        super().__init__(message)
        self.needed = needed


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * GIB


def usable_cpu_count() -> int:
    """The cores this process may run on (its affinity set: taskset, a container's cpuset),
    which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workspace_bytes(fp: ModelFootprint, prefill_chunk_size: int, max_num_sequence: int) -> int:
    # Activations of one prefill chunk (hidden, qkv, gate/up) plus the logits of a batch.
    per_token = 4 * fp.hidden_size + 2 * fp.intermediate_size
    return 4 * (prefill_chunk_size * per_token + 2 * max_num_sequence * fp.vocab_size)


def _one_sequence(footprint: ModelFootprint, ctx: int, prefill: int, page: int) -> int:
    """KV tokens a full-length request needs: the context window, or with a releasing sliding
    window what a sliding sequence holds at most (its window, a prefill chunk it appends before
    the cache slides, and the pages either may straddle)."""
    if footprint.kv_window is None:
        return ctx
    return min(ctx, footprint.kv_window + prefill + 2 * page)


def served_context_window(o: EngineOverrides, model_window: int) -> int:
    """The context window served for a model of `model_window` tokens: the override's, capped
    by max_single_sequence_length (resolve_engine_config refuses one above the model's)."""
    ctx = o.context_window_size or model_window
    if o.max_single_sequence_length is not None:
        ctx = min(ctx, o.max_single_sequence_length)
    return ctx


def resolve_engine_config(
    config: ServerConfig,
    footprint: ModelFootprint,
    *,
    available_bytes: Callable[[], int] = available_memory_bytes,
) -> tuple[EngineConfig, MemoryEstimate]:
    o = config.overrides
    _refuse_unsupported(o)
    ctx = served_context_window(o, footprint.context_window_size)
    if ctx > footprint.context_window_size:
        raise ConfigError(
            f"context_window_size={ctx} exceeds the model's {footprint.context_window_size}"
        )
    utilization = o.gpu_memory_utilization or 0.85
    budget = config.memory_budget_bytes
    if budget is None:
        budget = int(available_bytes() * utilization)
    max_num_sequence = (
        o.max_num_sequence or {"interactive": 1, "local": 4, "server": 128}[config.mode]
    )
    if config.mode == "interactive" and o.max_num_sequence is None:
        max_num_sequence = 1
    prefill = o.prefill_chunk_size or min(ctx, 2048)
    workspace = _workspace_bytes(footprint, prefill, max_num_sequence)
    free_for_kv = budget - footprint.weight_bytes - workspace
    per_token = footprint.kv_bytes_per_token
    fits = free_for_kv // per_token if per_token else 1 << 30
    if o.max_total_seq_length is not None:
        total = o.max_total_seq_length
    elif config.mode == "server":
        total = int(min(fits, max(ctx, 1 << 20)))
    else:
        total = min(ctx, int(fits))
    one = _one_sequence(footprint, ctx, prefill, o.kv_page_size or 16)
    if total < one and o.max_total_seq_length is not None:
        raise ConfigError(
            f"max_total_seq_length={total} is smaller than "
            + (f"what one sequence holds ({one})" if one < ctx else f"the context window ({ctx})")
            + ": a single full-length request could never run."
        )
    estimate = MemoryEstimate(footprint.weight_bytes, total * per_token, workspace, budget)
    _check_fits(estimate, total, ctx, per_token, config.mode)
    engine = EngineConfig(
        model=config.model,
        mode=config.mode,
        max_num_sequence=max_num_sequence,
        max_total_seq_length=total,
        prefill_chunk_size=prefill,
        context_window_size=ctx,
        kv_page_size=o.kv_page_size or 16,
        gpu_memory_utilization=utilization,
        prefix_cache_mode=config.prefix_cache_mode,
        num_threads=o.num_threads,
    )
    if o.max_prefill_tokens_while_decoding is not None:
        engine = attrs.evolve(
            engine, max_prefill_tokens_while_decoding=o.max_prefill_tokens_while_decoding
        )
    engine = attrs.evolve(
        engine,
        speculative_mode=config.speculative_mode,
        spec_draft_length=o.spec_draft_length or 0,
        spec_max_batch=o.spec_max_batch or SPEC_MAX_BATCH.get(config.speculative_mode, 4),
    )
    if o.prefix_cache_max_num_recycling_seqs is not None:
        engine = attrs.evolve(
            engine, prefix_cache_max_num_recycling_seqs=o.prefix_cache_max_num_recycling_seqs
        )
    return engine, estimate


#: Where drafting stops paying, measured with bench/speculative.py (SmolLM2 F32 target, 2 cores;
#: docs/discussion/0009): small_draft gained 1.27x with 2 streams and lost from 4 on; n-gram
#: drafts still gained with 4 and lost with 8 on chat.
SPEC_MAX_BATCH = {"small_draft": 2, "ngram": 4}


def _check_fits(estimate: MemoryEstimate, total: int, ctx: int, per_token: int, mode: str) -> None:
    """DoesNotFit unless the estimate fits its budget with room for some tokens of KV cache."""
    if estimate.total_bytes > estimate.budget_bytes or total < min(ctx, 16):
        least = max(total, min(ctx, 16)) * per_token  # the least this check accepts
        raise DoesNotFit(
            f"the model does not fit: {estimate.describe()} (mode {mode}; lower "
            "max_total_seq_length / max_num_sequence / prefill_chunk_size, raise "
            "gpu_memory_utilization, or use a smaller quantization)",
            attrs.evolve(estimate, kv_cache_bytes=least),
        )


def _refuse_unsupported(o: EngineOverrides) -> None:
    """mlc_llm's override keys this engine cannot honour: an error, never a silent no-op."""
    unsupported = {
        "tensor_parallel_shards": (o.tensor_parallel_shards, 1, "one CPU process, no sharding"),
        "pipeline_parallel_stages": (o.pipeline_parallel_stages, 1, "no pipeline parallelism"),
        "max_history_size": (o.max_history_size, None, "no speculative decoding history"),
    }
    for key, (value, neutral, why) in unsupported.items():
        if value is None or value == neutral or (neutral == -1 and value <= 0):
            continue
        raise ConfigError(f"--overrides {key}={value} is not supported: {why}")


@attrs.define
class MemoryPlan:
    """How the models of one server share its memory budget, in load order (module docstring).

    `budget_for(k)` before model k loads, `taken(k, ...)` once it has; `refusal` turns model
    k's DoesNotFit into one line with every model's numbers."""

    names: tuple[str, ...]
    mode: str
    utilization: float
    available_bytes: Callable[[], int] = available_memory_bytes
    _available: int | None = None  # measured once, before the first model loads
    _taken: dict[int, int] = attrs.field(factory=dict)

    @property
    def total_bytes(self) -> int:
        if self._available is None:
            self._available = self.available_bytes()
        return int(self._available * self.utilization)

    def budget_for(self, k: int) -> int:
        left = self.total_bytes - sum(self._taken.values())
        if self.mode == "server":  # its KV cache would take all it is given
            left //= len(self.names) - k
        return max(0, left)

    def taken(self, k: int, estimate: MemoryEstimate | None) -> None:
        self._taken[k] = estimate.total_bytes if estimate is not None else 0

    def refusal(self, k: int, needed: MemoryEstimate) -> ConfigError:
        parts = [f"{self.names[j]} takes {b / GIB:.2f} GiB" for j, b in self._taken.items()]
        parts.append(
            f"{self.names[k]} needs {needed.total_bytes / GIB:.2f} GiB (weights "
            f"{needed.weight_bytes / GIB:.2f} + KV cache {needed.kv_cache_bytes / GIB:.2f} + "
            f"workspace {needed.workspace_bytes / GIB:.2f}) of the {self.budget_for(k) / GIB:.2f}"
            " GiB left"
        )
        assert self._available is not None
        return ConfigError(
            f"the {len(self.names)} models do not fit in memory: " + ", ".join(parts)
            + f"; their budget is {self.total_bytes / GIB:.2f} GiB ({self.utilization:.0%} of "
            f"{self._available / GIB:.2f} GiB available; mode {self.mode})"
        )  # fmt: skip
