"""Progress bars that behave in terminals, notebooks and book builds alike.

``tqdm.auto`` falls back to text with a warning on stderr when ipywidgets is missing;
a book build with ``-W`` turns that warning into an error, so the widget bar is used
only when ipywidgets is importable.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``); silent when disabled."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(iterable, disable=not enabled, **kwargs)
