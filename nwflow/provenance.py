"""How a result was produced: recorded beside every saved result.

Long runs (``nwflow.experiments``) write ``book/results/*.json`` with a ``provenance``
block so a chapter can say which commit, machine and configuration made its numbers.
Files are written atomically: a temporary file in the same folder, then a rename, so a
crash never leaves half a result on disk.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "git_commit"]


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The current git commit of ``repo`` (default: this package's checkout), or None."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _device_name(device: torch.device | str | None) -> str:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(config: dict[str, Any] | None = None, device: torch.device | str | None = None,
               wall_time_s: float | None = None) -> dict[str, Any]:
    """A JSON-ready record: git commit, device, library versions, config, time.

    ``config`` is stored as given (it must be JSON-serialisable); ``wall_time_s`` is the
    run's duration when known.
    """
    import numpy

    import nwflow

    record: dict[str, Any] = {
        "git_commit": git_commit(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(torch.device(device) if device is not None else "cpu"),
        "device_name": _device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {"nwflow": nwflow.__version__, "torch": torch.__version__,
                     "numpy": numpy.__version__},
        "fast_mode": os.environ.get("NWFLOW_FAST", "") not in ("", "0"),
        "config": dict(config or {}),
    }
    if wall_time_s is not None:
        record["wall_time_s"] = float(wall_time_s)
    return record
