"""``ptq4vm``: the command line (demo, convert, quantize, eval, report).

``entry`` is the console command (``run``); ``app`` parses and dispatches and prints errors;
each command has a module of its own (``convert``, ``quantize``, ``evaluation``, ``demo``,
``report``); ``paths``, ``dataspecs``, ``loading``, ``signals`` and ``table`` hold the checks and
plumbing the commands share; ``errors`` is the CLI's wording of mistakes. The names below load
with their modules on first use, so that importing ``entry`` loads no jax; for the same
reason, the commands' modules import what loads jax inside the functions that use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptq4vm_jax.lazy import lazy_attributes

if TYPE_CHECKING:
    from ptq4vm_jax.cli.app import build_parser, main
    from ptq4vm_jax.cli.entry import run

_EXPORTS = {"build_parser": "ptq4vm_jax.cli.app", "main": "ptq4vm_jax.cli.app", "run": "ptq4vm_jax.cli.entry"}
__all__ = ["build_parser", "main", "run"]
__getattr__, __dir__ = lazy_attributes(__name__, __path__, _EXPORTS, globals())
