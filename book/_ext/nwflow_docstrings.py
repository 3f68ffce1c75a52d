"""Sphinx extension: nwflow's docstrings are shown as written, in a preformatted block.

The library's docstrings are plain text with ASCII mathematics (``||x - t x^(j)||^2``,
shapes such as ``(B, *S)``). Read as reStructuredText, ``*``, ``|`` and indentation turn
into broken markup and warnings (which fail the ``-W`` build), so each docstring is handed
to autodoc as one literal block: the reader sees exactly what ``help()`` shows, next to
the signature that autodoc renders from the code.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def as_literal_block(lines: list[str]) -> list[str]:
    """The docstring lines as one reStructuredText literal block (empty when there are none)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    if not any(line.strip() for line in lines):
        return []
    return ["::", ""] + [f"    {line}" if line.strip() else "" for line in lines] + [""]


def _process(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = as_literal_block(list(lines))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
