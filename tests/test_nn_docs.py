"""The python snippets of the gradbalance.nn docs pages run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "nn").glob("*.md")) + [ROOT / "docs" / "guide" / "sharing.md"]


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page, capsys):
    blocks = _blocks(page)
    assert blocks, f"{page.name} has no python snippet"
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102
