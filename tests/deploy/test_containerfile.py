"""deploy/Containerfile, checked without a container runtime (none on the test machines).

What an image build would find out first is checked here: every COPY source exists and gets
past the build-context filter, the package builds (a wheel, offline) from exactly the copied
files, the default command parses with mlctrio's own parser and listens on the exposed port, and
the router stage pins the sglang-router the tests run against. A real build is
`podman build -f deploy/Containerfile .` (deploy/README.md).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from mlctrio.cli import RaisingParser, build_parser, config_from_args

from .manifests import DEPLOY, ROOT

CONTAINERFILE = DEPLOY / "Containerfile"
IGNOREFILE = DEPLOY / "Containerfile.dockerignore"


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, (KEYWORD, rest), continuation lines joined."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            _, _, name = rest.partition(" AS ")
            current = result.setdefault(name.strip(), [])
        current.append((keyword.upper(), rest.strip()))
    return result


def instruction(stage: str, keyword: str) -> list[str]:
    return [rest for kw, rest in stages()[stage] if kw == keyword]


def copy_sources() -> list[str]:
    return [
        src
        for stage in stages()
        for rest in instruction(stage, "COPY")
        for src in shlex.split(rest)[:-1]
    ]


def test_stages_and_copy_sources_exist() -> None:
    assert set(stages()) == {"router", "mlctrio"}
    assert list(stages())[-1] == "mlctrio"  # the default target is the server
    sources = copy_sources()
    assert "mlctrio" in sources and "pyproject.toml" in sources
    for src in sources:
        assert (ROOT / src).exists(), src


def test_the_build_context_filter_keeps_what_is_copied() -> None:
    lines = [ln.strip() for ln in IGNOREFILE.read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"  # everything else (.venv, caches) stays out of the context
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for src in copy_sources():
        assert src.rstrip("/") in kept, src


def test_the_default_command_parses_and_listens_on_the_exposed_port() -> None:
    (entrypoint,) = instruction("mlctrio", "ENTRYPOINT")
    (cmd,) = instruction("mlctrio", "CMD")
    assert json.loads(entrypoint) == ["mlctrio"]
    config = config_from_args(build_parser(RaisingParser).parse_args(json.loads(cmd)))
    assert config.host == "0.0.0.0"
    assert instruction("mlctrio", "EXPOSE") == [str(config.port)]
    env = " ".join(instruction("mlctrio", "ENV"))
    assert "MLCTRIO_CACHE_DIR=/cache" in env
    assert instruction("mlctrio", "VOLUME") == ["/cache"]


def test_the_router_stage_pins_the_tested_sglang_router() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [r for r in extra["optional-dependencies"]["test"] if r.startswith("sglang-router")]
    (run,) = instruction("router", "RUN")
    assert pin in run.split()


def test_the_package_builds_from_the_copied_files(tmp_path: Path) -> None:
    """`pip install .` in the image sees only the COPY sources: run setuptools' build_py (what
    a wheel holds, offline) on a copy of just those, and look for every module and data file."""
    context = tmp_path / "src"
    context.mkdir()
    for src in copy_sources():
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, context / src)
    out = tmp_path / "build"
    setup = [sys.executable, "-c", "from setuptools import setup; setup()"]
    result = subprocess.run(
        [*setup, "-q", "build_py", "--build-lib", str(out)],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    built = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    expected = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "mlctrio").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts  # every module and data file
    }
    assert len(expected) > 50
    assert expected <= built, sorted(expected - built)[:5]


def test_the_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    assert len(files) >= 8
    for path in files:
        assert str(path.relative_to(DEPLOY)) in readme, path
