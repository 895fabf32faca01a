"""The bundled micro models: one float-params checkpoint directory per model (README.md says how
each was trained), found here without a download."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent


def bundled_models() -> list[str]:
    """The names of the bundled models (each a directory of ``ASSETS`` holding a checkpoint)."""
    return sorted(m.parent.name for m in ASSETS.glob("*/metadata.json"))
