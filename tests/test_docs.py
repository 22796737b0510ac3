"""The examples cannot rot: every ``python`` code block of the README and of every docs page
runs, and so does every ``>>>`` example in the docstrings of the ``gradbalance`` package.

Code blocks
    Pages are found at collection time (``README.md`` and ``docs/**/*.md``), so a page added
    later is covered without touching this file. Each page is one test: its ``python`` blocks
    (fences tagged ``python``, ``py`` or ``python3``, with or without attributes such as
    ``title="..."``, indented inside admonitions or not) run **in order, in one namespace per
    page**, so a page reads like a script whose later blocks use what earlier blocks defined.
    Every page starts from a fresh namespace, ``torch.manual_seed(0)``, an empty temporary
    working directory, and a copy of the method registry that is restored afterwards (a page
    that registers a method does not leak it into other tests).

    A block may be left out ONLY if it needs a GPU or several processes: write
    ``<!-- skip: needs a GPU -->`` (or ``... multiple processes``) on the line just before the
    fence AND list it in ``SKIPPED`` below as ``(page, first line of the block)``. A skip
    comment without such a reason, an unlisted skip, or a listed block that is not skipped
    fails.

Docstrings
    Every module under ``gradbalance/`` is imported and its docstring examples are run with
    :mod:`doctest` (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``), one test per module.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gradbalance
from gradbalance.methods import base as methods_base

ROOT = Path(__file__).resolve().parents[1]

# (page relative to the repository root, first line of the block): blocks that are not run.
# Each one needs a GPU or several processes; nothing else may be skipped.
SKIPPED: set[tuple[str, str]] = set()

_SKIP_REASON = re.compile(r"gpu|cuda|multiple processes|multi-process|torchrun|distributed", re.IGNORECASE)
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})\s*(?P<lang>[\w+-]*)(?P<attrs>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip\b:?(?P<reason>.*?)-->\s*$", re.IGNORECASE)
_PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None  # the skip comment's reason, or None


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [p for p in pages if p.is_file()]


def python_blocks(path: Path) -> list[Block]:
    """The python fenced blocks of a Markdown file, dedented, with their skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        end = i + 1
        close = re.compile(rf"^{re.escape(indent)}`{{{len(fence)},}}\s*$")
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if lang in _PYTHON:
            body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : end]]
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            sm = _SKIP.match(prev)
            blocks.append(Block(page, i + 2, "\n".join(body) + "\n", sm["reason"].strip() if sm else None))
        i = end + 1
    return blocks


def _first_line(block: Block) -> str:
    return next((ln.strip() for ln in block.code.splitlines() if ln.strip()), "")


def test_pages_are_discovered():
    pages = {p.relative_to(ROOT).as_posix() for p in doc_pages()}
    assert "README.md" in pages and "docs/index.md" in pages
    # the README's example is a real block (the parser found it)
    assert python_blocks(ROOT / "README.md")


def test_fence_parser_handles_titles_indentation_and_skips(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n!!! note\n    ```python title=\"x.py\"\n    b = a + 1\n"
        "    ```\n\n<!-- skip: needs a GPU -->\n```py\nc = 3\n```\n\n```bash\nnot python\n```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = python_blocks(page)
    assert [b.code for b in blocks] == ["a = 1\n", "b = a + 1\n", "c = 3\n"]
    assert [b.line for b in blocks] == [4, 9, 14]
    assert [b.skip for b in blocks] == [None, None, "needs a GPU"]


def test_skips_are_justified_and_listed():
    found = {
        (b.page, _first_line(b)): b.skip
        for p in doc_pages()
        for b in python_blocks(p)
        if b.skip is not None
    }
    for key, reason in found.items():
        assert _SKIP_REASON.search(reason), (
            f"{key}: a block may only be skipped if it needs a GPU or several processes, got {reason!r}"
        )
    assert set(found) == SKIPPED, (
        "skipped blocks and SKIPPED differ: list every skipped block in tests/test_docs.py "
        f"(unlisted: {set(found) - SKIPPED}, listed but not skipped: {SKIPPED - set(found)})"
    )


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in doc_pages()])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = [b for b in python_blocks(ROOT / page) if b.skip is None]
    if not blocks:
        return  # a page without python code (the check is then that it was looked at)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    registry = dict(methods_base._REGISTRY)
    module = types.ModuleType("_docs_page_" + re.sub(r"\W", "_", page))
    sys.modules[module.__name__] = module  # classes defined in a page can be pickled
    torch.manual_seed(0)
    try:
        for block in blocks:
            # pad so that tracebacks point at the line of the Markdown file
            code = compile("\n" * (block.line - 1) + block.code, str(ROOT / page), "exec")
            exec(code, module.__dict__)  # noqa: S102 - running the docs is the point
    finally:
        del sys.modules[module.__name__]
        methods_base._REGISTRY.clear()
        methods_base._REGISTRY.update(registry)


def _modules() -> list[str]:
    names = [gradbalance.__name__]
    for info in pkgutil.walk_packages(gradbalance.__path__, prefix="gradbalance."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    torch.manual_seed(0)
    for test in finder.find(module, name):
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(out)


def test_docstring_examples_exist():
    finder = doctest.DocTestFinder(exclude_empty=True)
    count = sum(
        len(t.examples) for name in _modules() for t in finder.find(importlib.import_module(name), name)
    )
    assert count >= 5
