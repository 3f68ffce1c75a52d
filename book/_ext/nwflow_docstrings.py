"""Sphinx extension: nwflow's docstrings are shown as written, except their ``.. math::`` blocks.

The library's docstrings are plain text with ASCII mathematics (``||x - t x^(j)||^2``,
shapes such as ``(B, *S)``). Read as reStructuredText, ``*``, ``|`` and indentation turn
into broken markup and warnings (which fail the ``-W`` build), so every run of such lines
is handed to autodoc as a literal block: the reader sees what ``help()`` shows. The
equations are written as ``.. math::`` directives with their indented LaTeX body; those
pass through as reStructuredText, and MathJax renders them on the API pages.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

MATH = ".. math::"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal(lines: list[str]) -> list[str]:
    """A run of lines as one unhighlighted literal block (nothing when the run is blank)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    if not lines:
        return []
    # ``code:: text``: a literal block that is not highlighted as Python (the prose's "and",
    # "with" would be coloured as keywords).
    return [".. code:: text", ""] + [f"    {line}" if line.strip() else "" for line in lines] + [""]


def to_rest(lines: list[str]) -> list[str]:
    """The docstring lines as reStructuredText: each ``.. math::`` line with the lines indented
    below it (blank lines inside included) as a math directive, moved to the left margin;
    every run of other lines as a literal block."""
    out: list[str] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(MATH):
            prose.append(line)
            i += 1
            continue
        out += _literal(prose)
        prose = []
        depth = _indent(line)
        end = i + 1  # one past the body's last non-blank line
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > depth):
            j += 1
            if lines[j - 1].strip():
                end = j
        out += [body[depth:] if body.strip() else "" for body in lines[i:end]] + [""]
        i = end
    return out + _literal(prose)


def _process(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = to_rest(list(lines))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
