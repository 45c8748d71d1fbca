"""Load the models a server serves: one `ModelLoad` per model, one `ModelSet` for all of them.

`mlctrio serve MODEL --additional-models M1 M2` serves three models, each with its own engine
(`AsyncEngine`: its worker thread, its KV cache, its metrics children). serve.py and app.py load
them one after another with `ModelSet.load_all` and start the engines once all are loaded.

Rules:
- A load runs on a thread trio abandons when it is cancelled (a thread cannot be stopped, and a
  first compile takes minutes): a stop while loading returns at once, and the caller then
  leaves without waiting for that thread (`abandoned`).
- A load error that is not ours becomes one ModelLoadError line (`one_line`); `failed_model`
  names the model whose load failed, so the operator's line says which one.
- Memory: the models share one budget (sizing.MemoryPlan): each one is sized, when its turn to
  load comes, from what the models before it left; one that does not fit is refused with every
  model's numbers. One model alone is sized exactly as before (no plan).
- CPU threads: with N models and neither TVM_NUM_THREADS nor `num_threads` given, each engine's
  TVM thread pool gets cores // N threads (`split_threads`): N pools of every core each would
  oversubscribe the CPU while the engines decode at the same time (docs/discussion/0008).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .config import ServerConfig
from .errors import MlctrioError, ModelLoadError
from .loader import CoreFactory, core_factory
from .service import AsyncEngine
from .sizing import (
    DoesNotFit,
    MemoryEstimate,
    MemoryPlan,
    available_memory_bytes,
    usable_cpu_count,
)

FactoryFor = Callable[[ServerConfig], CoreFactory]


def one_line(exc: BaseException) -> str:
    """An exception as one line for an operator: our own messages as they are, a foreign one
    with its type (for a TVM error, its last line: its first is "Traceback ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1] if "Traceback" in lines[0] else lines[0]
    return text if isinstance(exc, MlctrioError) else f"{type(exc).__name__}: {text}"


@attrs.define(eq=False)
class ModelLoad:
    """One model's load, run by `load()` on a thread trio abandons if the load is cancelled.
    Handed to `AsyncEngine` as its core factory: called on the engine thread after `load()`, it
    returns what was loaded."""

    model: str
    factory: CoreFactory
    loaded: tuple[Any, Any] | None = None
    abandoned: bool = False  # cancelled while loading: the thread may still run
    failed: bool = False

    async def load(self) -> None:
        """Load; an error that is not ours becomes a one-line ModelLoadError."""
        try:
            self.loaded = await trio.to_thread.run_sync(self.factory, abandon_on_cancel=True)
        except trio.Cancelled:
            self.abandoned = True
            raise
        except MlctrioError:
            self.failed = True
            raise
        except Exception as exc:
            self.failed = True
            raise ModelLoadError(one_line(exc)) from exc

    def __call__(self) -> Any:
        if self.loaded is None:  # not loaded beforehand: load here, on the engine thread
            return self.factory()
        loaded, self.loaded = self.loaded, None
        return loaded


async def load_unless_stopped(model_load: ModelLoad, stop: trio.Event) -> bool:
    """Load the model unless `stop` is set first (the load is then abandoned). Loaded?"""
    async with trio.open_nursery() as nursery:

        async def cancel_on_stop() -> None:
            await stop.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_on_stop)
        await model_load.load()
        nursery.cancel_scope.cancel()
    return model_load.loaded is not None


def split_threads(configs: tuple[ServerConfig, ...]) -> tuple[ServerConfig, ...]:
    """Each engine's TVM pool: cores // N threads with N models, unless the operator chose
    (TVM_NUM_THREADS, or `--overrides num_threads=`)."""
    if len(configs) < 2 or os.environ.get("TVM_NUM_THREADS"):
        return configs
    if configs[0].overrides.num_threads is not None:
        return configs
    threads = max(1, usable_cpu_count() // len(configs))
    overrides = attrs.evolve(configs[0].overrides, num_threads=threads)
    return tuple(attrs.evolve(c, overrides=overrides) for c in configs)


def _estimate(info: Any) -> MemoryEstimate | None:
    memory = getattr(info, "config", {}).get("memory")
    return MemoryEstimate(**memory) if isinstance(memory, dict) else None


def _sized(plan: MemoryPlan, k: int, config: ServerConfig, factory_for: FactoryFor) -> CoreFactory:
    """Model k's factory, sized when it runs from what the models loaded before it left."""

    def build() -> tuple[Any, Any]:
        sized = attrs.evolve(config, memory_budget_bytes=plan.budget_for(k))
        try:
            core, info = factory_for(sized)()
        except DoesNotFit as exc:
            raise plan.refusal(k, exc.needed) from exc
        plan.taken(k, _estimate(info))
        return core, info

    return build


@attrs.define(eq=False)
class ModelSet:
    """The models of one server, the main one first: each one's configuration, load and
    engine (`engines[k]` runs what `loads[k]` loaded)."""

    configs: tuple[ServerConfig, ...]
    loads: list[ModelLoad]
    engines: list[AsyncEngine]

    @classmethod
    def build(
        cls,
        config: ServerConfig,
        *,
        factory_for: FactoryFor = core_factory,
        available_bytes: Callable[[], int] = available_memory_bytes,
    ) -> ModelSet:
        configs = split_threads(config.model_configs())
        if len(configs) == 1:
            factories = [factory_for(config)]
        else:
            plan = MemoryPlan(
                tuple(c.model_name for c in configs),
                config.mode,
                config.overrides.gpu_memory_utilization or 0.85,
                available_bytes,
            )
            factories = [_sized(plan, k, c, factory_for) for k, c in enumerate(configs)]
        loads = [ModelLoad(c.model, f) for c, f in zip(configs, factories, strict=True)]
        engines = [AsyncEngine(config.max_queued_requests, load) for load in loads]
        return cls(configs, loads, engines)

    @property
    def names(self) -> list[str]:
        return [c.model_name for c in self.configs]

    async def load_all(self, stop: trio.Event) -> bool:
        """Load every model in turn unless `stop` is set first. All loaded?"""
        for load in self.loads:
            if not await load_unless_stopped(load, stop):
                return False
        return True

    @property
    def abandoned(self) -> bool:
        """A load was cancelled: its thread may still run (do not wait for it)."""
        return any(load.abandoned for load in self.loads)

    def failed_model(self) -> str | None:
        """The model whose load failed, if one did."""
        return next((load.model for load in self.loads if load.failed), None)
