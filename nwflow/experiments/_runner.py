"""What every experiment runner shares: presets, the command line, checkpoints, the results file.

An experiment module (``nwflow/experiments/<name>.py``) defines ``PRESETS`` with the keys
:data:`PRESET_NAMES` and a ``run_experiment(config, ...)`` that returns JSON-ready results
holding ``"config"`` and ``"wall_seconds"``; its ``main`` builds the command line with
:func:`parser` and writes the results with :func:`write_results`.

- ``smoke``: seconds on a CPU, for the tests; ``cpu``: what a laptop CPU runs in minutes;
  ``gpu``: the scaled run for a GPU.
- Results: :func:`result_path`, ``nwflow.settings.results_dir()/<stem>_<preset>.json``, and
  ``results_dir()/gpu/`` for the ``gpu`` preset, so a chapter finds them one way.
- Checkpoints: :func:`checkpoint_file`, named after a hash of the configuration (a changed
  run never resumes a stale file), by default in ``nwflow.settings.cache_dir(<name>)``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from nwflow._checks import check_choice
from nwflow._io import write_json_atomic
from nwflow.provenance import provenance
from nwflow.settings import checkpoint_path, config_hash, default_device, results_dir

__all__ = ["PRESET_NAMES", "configure", "result_path", "checkpoint_file", "parser", "write_results",
           "committed_weights"]

PRESET_NAMES = ("smoke", "cpu", "gpu")


def configure(presets: dict[str, dict[str, Any]], common: dict[str, Any], name: str,
              overrides: dict[str, Any]) -> dict[str, Any]:
    """The configuration ``{"preset": name, **common, **presets[name], **overrides}``.

    Raises ``ValueError`` for an unknown preset ``name`` or an override key that the preset
    does not define, so a typo never silently trains the default.
    """
    check_choice(name, "preset", sorted(presets))
    config = {"preset": name, **common, **presets[name]}
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    config.update(overrides)
    return config


def result_path(stem: str, preset: str, variant: str = "") -> Path:
    """``results_dir() / f"{stem}_{preset}{variant}.json"``, inside ``gpu/`` for the gpu preset."""
    check_choice(preset, "preset", PRESET_NAMES)
    folder = results_dir() / "gpu" if preset == "gpu" else results_dir()
    return folder / f"{stem}_{preset}{variant}.json"


def checkpoint_file(folder: str | os.PathLike | None, name: str, prefix: str, config: dict[str, Any]) -> Path:
    """:func:`nwflow.settings.checkpoint_path` (in ``cache_dir(name)``, what a chapter resumes too),
    or the same file name inside ``folder`` when one is given."""
    return checkpoint_path(name, prefix, config, folder)


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options every runner takes: ``--preset``, ``--device``, ``--out``, ``--checkpoint-dir``,
    ``--no-progress``; an experiment (checkpoints in ``cache_dir(name)``) adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="cpu", choices=PRESET_NAMES)
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--out", default=None,
                   help=f"JSON path (default: the preset's file in {results_dir()}, gpu/ for gpu)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder of the resumable training checkpoints (default: nwflow.settings.cache_dir"
                        f"({name!r}), kept between runs unless NWFLOW_FAST is set)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def write_results(path: str | os.PathLike, results: dict[str, Any], device: str) -> Path:
    """Add a ``provenance`` block to ``results`` and write them atomically as JSON to ``path``.

    The configuration is stored once, as ``results["config"]`` (what the chapters read);
    the provenance block records how it ran: commit, command line, machine, wall time.
    """
    if "config" not in results or "wall_seconds" not in results:
        raise ValueError("results must hold 'config' and 'wall_seconds'")
    results["provenance"] = provenance(device=device, wall_time_s=results["wall_seconds"])
    return write_json_atomic(path, results)


def committed_weights(path: str | os.PathLike, config: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The model weights committed at ``path`` for ``config``, or None.

    The file is a ``torch.save`` dict holding ``"state_dict"`` (weights only, no optimiser
    state) and ``"config_hash"`` (:func:`nwflow.settings.config_hash` of the configuration that
    trained them). None when the file is missing or was written for another configuration, so
    the caller trains instead of loading stale weights. Loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if stored.get("config_hash") != config_hash(config):
        return None
    return stored["state_dict"]
