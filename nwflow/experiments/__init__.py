"""Command-line entry points for the scaled runs; each writes ``book/results/*.json`` with provenance."""

from __future__ import annotations

from typing import Any


def configure(presets: dict[str, dict[str, Any]], common: dict[str, Any], name: str,
              overrides: dict[str, Any]) -> dict[str, Any]:
    """The configuration ``{"preset": name, **common, **presets[name], **overrides}``.

    Raises ``ValueError`` for an unknown preset ``name`` or an override key that the preset
    does not define, so a typo never silently trains the default.
    """
    if name not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {name!r}")
    config = {"preset": name, **common, **presets[name]}
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    config.update(overrides)
    return config
