"""``ptq4vm``: the command line (demo, convert, quantize, eval, report).

``entry`` is the console command (``run``); ``app`` parses and dispatches and prints errors;
each command has a module of its own (``convert``, ``quantize``, ``evaluation``, ``demo``,
``report``); ``paths``, ``dataspecs``, ``loading``, ``signals`` and ``table`` hold the checks and
plumbing the commands share; ``errors`` is the CLI's wording of mistakes. The names below load
with their modules on first use, so that importing ``entry`` loads no jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptq4vm_jax.cli.app import build_parser, main
    from ptq4vm_jax.cli.demo import ASSETS
    from ptq4vm_jax.cli.entry import run

_EXPORTS = {"ASSETS": "ptq4vm_jax.cli.demo", "build_parser": "ptq4vm_jax.cli.app",
            "main": "ptq4vm_jax.cli.app", "run": "ptq4vm_jax.cli.entry"}
__all__ = ["ASSETS", "build_parser", "main", "run"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
