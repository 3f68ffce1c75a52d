"""How a result was produced: recorded beside every saved result.

Long runs (``nwflow.experiments``, ``benchmarks/velocity.py``) write JSON with a
``provenance`` block so a chapter can say which commit, command, machine and versions made
its numbers. The configuration is stored once per file: an experiment's results hold it at
the top level (``results["config"]``, what the chapters read) and leave it out of the
block; a record without a top-level configuration (the benchmark's) passes it here and it
is stored as ``provenance["config"]``. Files written before this rule hold it in both
places, identically, and still read.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import torch

from nwflow._version import __version__
from nwflow.settings import fast_mode

__all__ = ["provenance", "git_commit", "git_dirty", "cpu_model"]

_HERE = Path(__file__).resolve().parent


def _git(args: list[str], repo: str | os.PathLike | None) -> str | None:
    # None when git is missing, times out, or the folder is not a checkout.
    cwd = Path(repo) if repo is not None else _HERE
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The current git commit of ``repo`` (default: this package's checkout), or None."""
    out = _git(["rev-parse", "HEAD"], repo)
    return (out or "").strip() or None


def git_dirty(repo: str | os.PathLike | None = None) -> bool | None:
    """True when ``repo`` (default: this package's checkout) has uncommitted changes or
    untracked files (``git status --porcelain`` prints anything), False when clean, None
    outside a checkout: a dirty result was not made by ``git_commit`` alone."""
    out = _git(["status", "--porcelain"], repo)
    return None if out is None else bool(out.strip())


def cpu_model() -> str:
    """The CPU's model name: ``model name`` of ``/proc/cpuinfo`` on Linux, else
    ``platform.processor()``, else the architecture (``platform.machine()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def provenance(config: dict[str, Any] | None = None, device: torch.device | str | None = None,
               wall_time_s: float | None = None) -> dict[str, Any]:
    """A JSON-ready record of how a result was made.

    Keys: ``git_commit``, ``git_dirty`` (see :func:`git_dirty`), ``command`` (``sys.argv``),
    ``created_utc``, ``device``, ``device_name`` (the GPU's name on CUDA, else the CPU model),
    ``cpu_model``, ``cpu_threads``, ``python``, ``versions`` (nwflow, torch, numpy),
    ``fast_mode``, ``wall_time_s`` when given, and ``config`` only when given (see the module
    docstring: the configuration is stored once per file). ``config`` must be
    JSON-serialisable.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    record: dict[str, Any] = {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": list(sys.argv),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": _device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {"nwflow": __version__, "torch": torch.__version__, "numpy": numpy.__version__},
        "fast_mode": fast_mode(),
    }
    if config is not None:
        record["config"] = dict(config)
    if wall_time_s is not None:
        record["wall_time_s"] = float(wall_time_s)
    return record
