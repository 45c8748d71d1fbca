"""The docs cannot drift: docs/configuration.md is what scripts/gen-config-doc writes from the CLI
parser, and every relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlctrio.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen-config-doc"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code (fenced blocks and code spans), without external URLs and
    same-page anchors, with any #fragment dropped."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    return [t.split("#", 1)[0] for t in targets if not _EXTERNAL.match(t)]


def test_configuration_reference_is_current() -> None:
    result = generate("--check")
    assert result.returncode == 0, result.stderr + result.stdout


def test_check_reports_a_stale_reference(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(CONFIG_DOC.read_text().replace("--max-body-bytes", "--max-body-size"))
    result = generate("--check", "--output", str(stale))
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert generate("--output", str(stale)).returncode == 0  # regenerating fixes it
    assert generate("--check", "--output", str(stale)).returncode == 0
    assert stale.read_text() == CONFIG_DOC.read_text()


def test_reference_names_every_serve_flag() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = CONFIG_DOC.read_text()
    options = [o for a in serve._actions for o in a.option_strings if o not in ("-h", "--help")]
    assert len(options) > 10
    missing = [o for o in options if not re.search(rf"`{re.escape(o)}[` ]", text)]
    assert missing == []


def test_link_extraction_ignores_code_and_urls() -> None:
    sample = (
        "See [the guide](docs/a.md#part), [site](https://x.org/), [top](#top), "
        '[mail](mailto:a@b.c), `[not](code.md)` and ![plot](img/p.png "title").\n'
        "```sh\n[no](fenced.md)\n```\n"
        "[ref]: ./b.md\n"
    )
    assert relative_links(sample) == ["docs/a.md", "img/p.png", "./b.md"]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path) -> None:
    broken = [
        target
        for target in relative_links(page.read_text())
        if target and not (page.parent / target).exists()
    ]
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files"
