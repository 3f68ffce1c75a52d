"""Progress bars that behave in terminals, notebooks and book builds alike, without warnings.

``tqdm.auto`` (through ``tqdm.autonotebook``) picks the widget bar whenever it runs inside a
Jupyter kernel and, when ipywidgets cannot be imported there, falls back to text with a
``TqdmWarning`` ("IProgress not found") on stderr. Book builds and nbval run chapters in such
a kernel, and the book is built with ``stderr_output: warn`` and ``-W``: that warning fails
the build. It appears whenever ipywidgets is installed but fails to import (a missing or
incompatible dependency), and with any ipywidgets-free environment that imports
``tqdm.auto``. This module never imports ``tqdm.auto``: it uses the widget bar only inside a
kernel whose ipywidgets actually provides one, and the text bar everywhere else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm as text_bar


def _in_kernel() -> bool:
    # A Jupyter (ZMQ) kernel: the only place a widget can be shown. IPython is imported by
    # the kernel itself, so its absence from sys.modules means a plain interpreter.
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _bar_class() -> type[text_bar]:
    """tqdm.notebook's bar in a kernel with working widgets, tqdm.std's text bar otherwise."""
    if not _in_kernel():
        return text_bar
    try:
        # tqdm.notebook itself only records a failed ipywidgets import (IProgress = None);
        # a broken ipywidgets can also raise something other than ImportError here.
        from tqdm import notebook
    except Exception:
        return text_bar
    return notebook.tqdm if notebook.IProgress is not None else text_bar


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> text_bar:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``); silent when disabled.

    The widget bar inside a Jupyter kernel whose ipywidgets imports, the text bar on stderr
    everywhere else (terminals, scripts, kernels without ipywidgets); neither warns.
    """
    return _bar_class()(iterable, disable=not enabled, **kwargs)
