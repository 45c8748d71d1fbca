"""Several models in one server, before any HTTP: the `MODEL[:NAME]` parser, the flags and
MLCTRIO_* variables that name them, duplicate names, and how they share the memory budget."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from mlctrio.app import config_from_env
from mlctrio.cli import build_parser, config_from_args
from mlctrio.config import EngineOverrides, ModelSpec, ServerConfig
from mlctrio.errors import ConfigError
from mlctrio.model_loads import ModelSet, split_threads
from mlctrio.sizing import GIB, MemoryEstimate, MemoryPlan

MIB = 1 << 20


@pytest.mark.parametrize(
    ("text", "model", "name"),
    [
        ("demo://tiny", "demo://tiny", None),
        ("demo://tiny:t", "demo://tiny", "t"),
        ("mock://echo?x=1", "mock://echo?x=1", None),
        ("mock://echo?delay_ms=5:fast", "mock://echo?delay_ms=5", "fast"),
        ("HF://org/name", "HF://org/name", None),
        ("HF://org/name:alias", "HF://org/name", "alias"),
        ("./m.Q4_0.gguf:small", "./m.Q4_0.gguf", "small"),
        ("/models/llama", "/models/llama", None),
        ("a:b/c", "a:b/c", None),  # what follows the last ':' holds a '/': part of the path
        ("mock://:x", "mock://:x", None),  # 'mock://' alone is no model string
        ("demo::x", "demo::x", None),  # nor is 'demo:' (a bare scheme)
        ("  demo://small:s  ", "demo://small", "s"),
    ],
)
def test_model_spec_splits_the_name_at_the_last_colon_only_when_it_can(
    text: str, model: str, name: str | None
) -> None:
    spec = ModelSpec.parse(text, exists=lambda _: False)
    assert (spec.model, spec.served_name) == (model, name)


def test_model_spec_default_name_and_refusals() -> None:
    assert ModelSpec.parse("mock://echo?delay_ms=5").name == "mock://echo"
    assert ModelSpec.parse("embedded://SmolLM2-135M-Instruct").name == "SmolLM2-135M-Instruct"
    assert ModelSpec.parse("demo://tiny:t").name == "t"
    # An existing file whose name holds ':' is that file, not a file and a name.
    assert ModelSpec.parse("/x/a:b", exists=lambda p: p == "/x/a:b").served_name is None
    with pytest.raises(ConfigError, match="empty served name"):
        ModelSpec.parse("demo://tiny:")
    with pytest.raises(ConfigError, match="empty model string"):
        ModelSpec.parse("  ")


def test_flags_and_env_name_the_same_models() -> None:
    args = build_parser().parse_args(
        ["serve", "mock://echo", "--additional-models", "demo://tiny:t",
         "mock://echo?delay_ms=5:fast", "--embedding-model", "mock://echo?context_window=64:emb"]
    )  # fmt: skip
    from_cli = config_from_args(args)
    from_env = config_from_env(
        {
            "MLCTRIO_MODEL": "mock://echo",
            "MLCTRIO_ADDITIONAL_MODELS": "demo://tiny:t, mock://echo?delay_ms=5:fast",
            "MLCTRIO_EMBEDDING_MODEL": "mock://echo?context_window=64:emb",
        }
    )
    assert from_cli == from_env
    assert from_cli.served_names == ("mock://echo", "t", "fast", "emb")
    assert from_cli.additional_models[1] == ModelSpec("mock://echo?delay_ms=5", "fast")
    configs = from_cli.model_configs()
    assert [c.model for c in configs] == [
        "mock://echo", "demo://tiny", "mock://echo?delay_ms=5", "mock://echo?context_window=64",
    ]  # fmt: skip
    assert [c.model_name for c in configs] == list(from_cli.served_names)
    assert all(c.additional_models == () for c in configs[1:])


def test_small_draft_takes_the_first_additional_model_as_its_draft() -> None:
    args = build_parser().parse_args(
        ["serve", "mock://echo", "--speculative-mode", "small_draft",
         "--additional-models", "demo://tiny", "demo://small:s"]
    )  # fmt: skip
    from_cli = config_from_args(args)
    from_env = config_from_env(
        {
            "MLCTRIO_MODEL": "mock://echo",
            "MLCTRIO_SPECULATIVE_MODE": "small_draft",
            "MLCTRIO_ADDITIONAL_MODELS": "demo://tiny demo://small:s",
        }
    )
    assert from_cli == from_env
    assert from_cli.draft_model == ModelSpec("demo://tiny")  # the draft is not served
    assert from_cli.served_names == ("mock://echo", "s")
    main, other = from_cli.model_configs()
    assert (main.speculative_mode, main.draft_model) == ("small_draft", ModelSpec("demo://tiny"))
    assert (other.speculative_mode, other.draft_model) == ("disable", None)  # MODEL's draft only
    ngram = config_from_args(
        build_parser().parse_args(["serve", "mock://echo", "--speculative-mode", "ngram",
                                   "--additional-models", "demo://tiny"])
    )  # fmt: skip
    assert ngram.draft_model is None and ngram.served_names == ("mock://echo", "demo://tiny")
    assert all(c.speculative_mode == "ngram" for c in ngram.model_configs())


def test_duplicate_served_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"two models are served as 'mock://echo'"):
        ServerConfig(model="mock://echo", additional_models=(ModelSpec("mock://echo?x=1"),))
    with pytest.raises(ConfigError, match=r"served as 'a' \(demo://tiny and demo://small\)"):
        ServerConfig(
            model="mock://echo",
            additional_models=(ModelSpec("demo://tiny", "a"), ModelSpec("demo://small", "a")),
        )
    ok = ServerConfig(model="mock://echo", additional_models=(ModelSpec("mock://echo", "b"),))
    assert ok.served_names == ("mock://echo", "b")


def test_cli_refuses_duplicate_names_in_one_line() -> None:
    argv = [sys.executable, "-m", "mlctrio", "serve", "mock://echo", "--port", "0",
            "--additional-models", "mock://echo?delay_ms=1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mlctrio: error: two models are served as 'mock://echo' (mock://echo and "
        "mock://echo?delay_ms=1): give one another name with MODEL:NAME"
    ]


def test_each_model_is_sized_from_what_the_models_before_it_left() -> None:
    plan = MemoryPlan(("a", "b", "c"), "local", 0.5, lambda: 1000 * MIB)
    assert plan.budget_for(0) == 500 * MIB
    plan.taken(0, MemoryEstimate(100 * MIB, 50 * MIB, 10 * MIB, 500 * MIB))
    assert plan.budget_for(1) == 340 * MIB
    plan.taken(1, None)  # a model that reports no estimate takes nothing
    assert plan.budget_for(2) == 340 * MIB
    # Server mode: the KV cache takes all it is given, so each model gets an equal share of
    # what is left among the models still to load.
    server = MemoryPlan(("a", "b"), "server", 1.0, lambda: 900 * MIB)
    assert server.budget_for(0) == 450 * MIB
    server.taken(0, MemoryEstimate(0, 450 * MIB, 0, 450 * MIB))
    assert server.budget_for(1) == 450 * MIB


def _load_all(models: ModelSet) -> None:
    async def main() -> None:
        assert await models.load_all(trio.Event())

    trio.run(main)


def test_the_second_model_gets_the_memory_the_first_left() -> None:
    config = ServerConfig(
        model="mock://echo?weight_mb=300",
        additional_models=(ModelSpec("mock://echo?weight_mb=100", "b"),),
    )
    models = ModelSet.build(config, available_bytes=lambda: 1000 * MIB)
    _load_all(models)
    budgets = []
    for load in models.loads:
        core, info = load()  # what the engine thread would get
        budgets.append(info.config["memory"]["budget_bytes"])
        core.close()
    assert budgets == [int(1000 * MIB * 0.85), int(1000 * MIB * 0.85) - 300 * MIB]


def test_models_that_do_not_fit_are_refused_with_every_models_numbers() -> None:
    config = ServerConfig(
        model="mock://echo?weight_mb=600",
        served_model_name="a",
        additional_models=(ModelSpec("mock://echo?weight_mb=400", "b"),),
    )
    models = ModelSet.build(config, available_bytes=lambda: 1000 * MIB)
    with pytest.raises(BaseExceptionGroup) as info:
        _load_all(models)
    error = info.value.exceptions[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, ConfigError)
    assert str(error) == (
        "the 2 models do not fit in memory: a takes 0.59 GiB, b needs 0.39 GiB (weights 0.39 + "
        "KV cache 0.00 + workspace 0.00) of the 0.24 GiB left; their budget is 0.83 GiB (85% of "
        "0.98 GiB available; mode local)"
    )
    assert models.failed_model() == "mock://echo?weight_mb=400"


def test_cli_refuses_models_that_do_not_fit_naming_the_model() -> None:
    big = 10**9  # MiB: more than any machine has, whatever it has free
    argv = [sys.executable, "-m", "mlctrio", "serve", "mock://echo", "--port", "0",
            "--additional-models", f"mock://echo?weight_mb={big}:big"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    needed = big * MIB / GIB
    assert len(errors) == 1 and errors[0].startswith(
        f"mlctrio: error: cannot load mock://echo?weight_mb={big}: the 2 models do not fit in "
        f"memory: mock://echo takes 0.00 GiB, big needs {needed:.2f} GiB (weights {needed:.2f}"
    )


def test_one_model_alone_is_sized_as_before() -> None:
    models = ModelSet.build(
        ServerConfig(model="mock://echo?weight_mb=600"), available_bytes=lambda: 1 << 40
    )
    # No plan: the factory sizes from the memory available when it runs, not from a budget.
    assert models.configs[0].memory_budget_bytes is None
    _load_all(models)
    core, info = models.loads[0]()
    core.close()
    assert info.config["memory"]["weight_bytes"] == 600 * MIB


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        ({}, EngineOverrides(), "split"),
        ({"TVM_NUM_THREADS": "3"}, EngineOverrides(), None),
        ({}, EngineOverrides(num_threads=5), 5),
    ],
)
def test_engines_split_the_cores_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    overrides: EngineOverrides,
    expected: str | int | None,
) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("mlctrio.model_loads.usable_cpu_count", lambda: 8)
    config = ServerConfig(
        model="mock://echo", overrides=overrides, additional_models=(ModelSpec("demo://tiny"),)
    )
    threads = [c.overrides.num_threads for c in split_threads(config.model_configs())]
    assert threads == ([4, 4] if expected == "split" else [expected, expected])
    alone = ServerConfig(model="demo://tiny").model_configs()
    assert split_threads(alone)[0].overrides.num_threads is None
