"""An undocumented public name fails CI.

- Every name in ``gradbalance.__all__`` and ``gradbalance.methods.__all__`` is rendered by a
  mkdocstrings directive (``::: path``) of some page under ``docs/``: a directive for the object
  itself, or for the module that defines it (all its public members, or a ``members:`` list
  naming it). Modules and plain values (``gb.methods``, ``gb.__version__``) are named in
  backticks on an API page instead.
- Every public function and class of ``gradbalance.__all__``, and every registered method
  class, has a ``>>>`` example in its docstring (``tests/test_docs.py`` runs them).
- Every registered method name has a page ``docs/methods/<name>.md`` that mentions the name in
  quotes (``method="<name>"``), and a row in the method table ``docs/methods/index.md``. A few
  names share a page: ``PAGE_ALIASES`` maps them to it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import gradbalance as gb
from gradbalance.methods import base as methods_base

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# registered names documented on another method's page: name -> page stem
PAGE_ALIASES = {
    "sum": "mean",
    "uncertainty": "uw",
    "aligned_mtl_ub": "aligned_mtl",
    "mgda_ub": "mgda",
}

_DIRECTIVE = re.compile(r"^:::\s*(?P<path>[\w.]+)\s*$")


def _resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def directives() -> list[tuple[str, object, dict[str, list[str]]]]:
    """Every ``::: path`` of the docs: (path, object, its ``members:``/``filters:`` lists)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            options: dict[str, list[str]] = {}
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                key = lines[j].strip()
                if key in ("members:", "filters:"):
                    values = options.setdefault(key[:-1], [])
                    k = j + 1
                    while k < len(lines) and lines[k].strip().startswith("- "):
                        values.append(lines[k].strip()[2:].strip().strip("\"'"))
                        k += 1
                elif key == "members: false":
                    options["members"] = []
                j += 1
            found.append((m["path"], _resolve(m["path"]), options))
    return found


def _passes(name: str, filters: list[str]) -> bool:
    """mkdocstrings' member filters: '!regex' excludes, a plain regex must match."""
    positive = [f for f in filters if not f.startswith("!")]
    if any(re.search(f[1:], name) for f in filters if f.startswith("!")):
        return False
    return not positive or any(re.search(f, name) for f in positive)


def _documented(name: str, obj: object, found) -> bool:
    for _, target, options in found:
        if target is obj:
            return True
        if not isinstance(target, types.ModuleType) or getattr(target, name, None) is not obj:
            continue
        members = options.get("members")
        if members is not None:
            if name in members:
                return True
            continue
        # no members list: the module's public members are rendered, i.e. what it defines
        # and what its __all__ re-exports, less what the filters drop
        exported = name in getattr(target, "__all__", ()) or getattr(obj, "__module__", None) == target.__name__
        if exported and _passes(name, options.get("filters", ["!^_"])):
            return True
    return False


def _public():
    names = [("gradbalance", n, getattr(gb, n)) for n in gb.__all__]
    names += [("gradbalance.methods", n, getattr(gb.methods, n)) for n in gb.methods.__all__]
    names += [("gradbalance.nn", n, getattr(gb.nn, n)) for n in gb.nn.__all__]
    return names


def test_directives_resolve():
    found = directives()
    assert any(path == "gradbalance.GradBalance" for path, _, _ in found)


@pytest.mark.parametrize("where,name,obj", _public(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_is_documented(where, name, obj):
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert _documented(name, obj, directives()), (
            f"{where}.{name} is public but no '::: ...' directive under docs/ renders it"
        )
    else:  # a module or a plain value: named on an API page
        text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
        assert re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", text), (
            f"{where}.{name} is public but no page under docs/api/ names it"
        )


def _registered_classes() -> list[type]:
    return sorted({f for f, _ in methods_base._REGISTRY.values() if inspect.isclass(f)}, key=str)


@pytest.mark.parametrize(
    "obj",
    [getattr(gb, n) for n in gb.__all__ if inspect.isclass(getattr(gb, n)) or inspect.isfunction(getattr(gb, n))]
    + _registered_classes(),
    ids=lambda o: o.__qualname__,
)
def test_public_objects_have_examples(obj):
    assert ">>>" in (inspect.getdoc(obj) or ""), f"{obj.__qualname__}'s docstring has no Example"


@pytest.mark.parametrize("name", sorted(gb.available_methods()))
def test_registered_method_has_a_page(name):
    page = DOCS / "methods" / f"{PAGE_ALIASES.get(name, name)}.md"
    assert page.is_file(), f"method {name!r} is registered but {page.relative_to(ROOT)} does not exist"
    assert f'"{name}"' in page.read_text(encoding="utf-8"), f"{page.name} never names {name!r}"
    table = (DOCS / "methods" / "index.md").read_text(encoding="utf-8")
    listed = {m.group(1) for m in re.finditer(r"^\|\s*`(\w+)`\s*\|", table, re.MULTILINE)}
    assert name in listed or PAGE_ALIASES.get(name) in listed, f"{name!r} has no row in docs/methods/index.md"
