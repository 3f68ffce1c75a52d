"""Run-time settings read from the environment.

``NWFLOW_FAST=1`` selects the small configuration of every chapter (tests and CI:
seconds per notebook); unset, chapters run at their book size (minutes at most on a
laptop CPU). ``NWFLOW_DATA_DIR`` points the loaders at local copies of the data sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = ["fast_mode", "pick", "data_dir", "default_device"]


def fast_mode() -> bool:
    """True when ``NWFLOW_FAST`` is set to a true value (1, true, yes)."""
    return os.environ.get("NWFLOW_FAST", "").strip().lower() in {"1", "true", "yes"}


def pick(fast: T, full: T) -> T:
    """``fast`` in fast mode, ``full`` otherwise: ``n = pick(500, 50_000)``."""
    return fast if fast_mode() else full


def data_dir() -> Path | None:
    """The folder named by ``NWFLOW_DATA_DIR``, or None when unset."""
    value = os.environ.get("NWFLOW_DATA_DIR", "").strip()
    return Path(value).expanduser() if value else None


def default_device() -> torch.device:
    """CUDA when available, else CPU: what the chapters run on."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
