"""Progress bars that behave in terminals, notebooks and book builds alike: always tqdm's
text bar, on stderr.

Two other choices fail the book:

- ``tqdm.auto`` (through ``tqdm.autonotebook``) falls back to text with a ``TqdmWarning``
  ("IProgress not found") on stderr whenever it runs in a Jupyter kernel whose ipywidgets is
  missing or fails to import; the book is built with ``stderr_output: warn`` and ``-W``, so
  that warning fails the build.
- The widget bar (``tqdm.notebook``, used where ipywidgets imports, which otter-grader
  installs) is a display output, not stderr: a chapter's ``remove-stderr`` tag does not hide
  it, and a page holding widget state loads require.js and the widget manager from a CDN, a
  request the offline site must never make.

The text bar is hidden by ``remove-stderr`` on the site, and shows in a terminal or a notebook
run by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm as text_bar


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> text_bar:
    """A tqdm text bar over ``iterable`` (or a manual one with ``total=``) on stderr; silent
    when disabled. Never a widget, never a warning (see the module docstring)."""
    return text_bar(iterable, disable=not enabled, **kwargs)
