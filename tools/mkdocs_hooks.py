"""MkDocs hooks: benchmark results in the site, and Sphinx-style roles rendered as code.

``on_files`` publishes ``benchmarks/results/*.md`` and ``*.png`` as ``results/<name>`` pages
and images, so the docs show the committed results without keeping a second copy of them.

mkdocstrings renders Google-style docstrings as Markdown, so a role such as
``:class:`~gradbalance.StepInfo``` would show up verbatim as ``:class:`` followed by the code.
This hook drops the role prefix from the rendered HTML and, as Sphinx does, shortens a
``~``-prefixed path to its last component.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)


def on_files(files, config, **kwargs):
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".md", ".png") and not path.stem.endswith("-quick"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
