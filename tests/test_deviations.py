"""docs/methods/deviations.md: one row for every registered method, linked from every method page."""

from __future__ import annotations

import re
from pathlib import Path

import gradbalance as gb

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods"


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in (DOCS / "deviations.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[name] = cells[1:]
    return rows


def test_every_registered_method_has_a_row_with_three_filled_columns():
    rows = _rows()
    assert set(rows) == set(gb.available_methods())
    for name, cells in rows.items():
        assert all(cells), f"{name}: an empty column"


def test_every_method_page_links_to_the_table():
    pages = [p for p in DOCS.glob("*.md") if p.name != "deviations.md"]
    assert len(pages) >= 20
    for page in pages:
        assert "(deviations.md)" in page.read_text(), page.name
