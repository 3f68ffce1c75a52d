"""Run-time settings read from the environment, and where runs keep their files.

``NWFLOW_FAST=1`` selects the small configuration of every chapter (tests and CI:
seconds per notebook); unset, chapters run at their book size (minutes at most on a
laptop CPU). ``NWFLOW_DATA_DIR`` points the loaders at local copies of the data sets.

Files a run keeps, found one way by every chapter and runner:

- committed results (JSON with provenance, small checkpoints): :func:`results_dir`,
  ``book/results`` of the checkout, or ``NWFLOW_RESULTS_DIR``;
- training checkpoints: :func:`checkpoint_path`, named after a hash of the run's
  configuration (a changed run never resumes a stale file), under ``~/.cache/nwflow``
  (or ``NWFLOW_CACHE_DIR``) in full mode, so an interrupted book build resumes, and in a
  temporary folder removed when the process exits in fast mode.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["fast_mode", "pick", "data_dir", "default_device", "results_dir", "cache_dir", "config_hash",
           "checkpoint_path"]

_SCRATCH: list[Path] = []


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


def results_dir() -> Path:
    """Where committed results live: ``NWFLOW_RESULTS_DIR``, else the checkout's ``book/results``,
    else the copy of ``book/results`` installed with the package (``nwflow/_results``).

    The packaged copy is what a chapter downloaded from the website (Colab, a laptop) reads
    when nwflow is installed from the repository rather than run from a checkout.
    """
    value = os.environ.get("NWFLOW_RESULTS_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    package = Path(__file__).resolve().parent
    checkout = package.parent / "book" / "results"
    # pyproject.toml installs book/results as the package data folder nwflow/_results.
    return checkout if checkout.is_dir() else package / "_results"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _scratch() -> Path:
    """One temporary folder per process for fast mode's checkpoints, ``nwflow-scratch-<pid>-*``.

    Removed at exit; but a kernel killed outright (nbval and nbclient do that) never runs its
    exit handlers, so each new folder also removes the ones whose process no longer runs.
    """
    if not _SCRATCH:
        root = Path(tempfile.gettempdir())
        for old in root.glob("nwflow-scratch-*-*"):
            pid = old.name.split("-")[2]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"nwflow-scratch-{os.getpid()}-", dir=root))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _SCRATCH.append(path)
    return _SCRATCH[0]


def cache_dir(name: str) -> Path:
    """A folder for one chapter's or runner's caches, created if missing.

    Full mode: ``NWFLOW_CACHE_DIR/name`` (default ``~/.cache/nwflow/name``), kept between
    runs. Fast mode: a per-process temporary folder, removed when the process exits.
    """
    # _checks' policy and wording, spelled here: settings is a floor beside _checks.
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name or os.sep in name:
        raise ValueError(f"name must be a non-empty folder name, got {name!r}")
    if fast_mode():
        root = _scratch()
    else:
        value = os.environ.get("NWFLOW_CACHE_DIR", "").strip()
        root = Path(value).expanduser() if value else Path.home() / ".cache" / "nwflow"
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_hash(config: dict[str, Any]) -> str:
    """12 hex digits of SHA-1 over the configuration as sorted JSON."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_path(name: str, prefix: str, config: dict[str, Any],
                    folder: str | os.PathLike | None = None) -> Path:
    """``cache_dir(name) / f"{prefix}-{config_hash(config)}.pt"``: resumable, never stale.

    ``folder`` (e.g. a runner's ``--checkpoint-dir``) replaces ``cache_dir(name)``.
    """
    root = cache_dir(name) if folder is None else Path(folder)
    return root / f"{prefix}-{config_hash(config)}.pt"
