"""MkDocs hooks: render the Sphinx-style roles found in docstrings (``:class:`X```) as code.

mkdocstrings renders Google-style docstrings as Markdown, so a role such as
``:class:`~gradbalance.StepInfo``` would show up verbatim as ``:class:`` followed by the code.
This hook drops the role prefix from the rendered HTML and, as Sphinx does, shortens a
``~``-prefixed path to its last component.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)
