"""``ptq4vm``: the command line (demo, convert, quantize, eval, report).

``main.py`` parses and dispatches and prints errors; each command has a module of its own
(``convert``, ``quantize``, ``evaluation``, ``demo``, ``report``); ``paths``, ``dataspecs``,
``loading``, ``signals`` and ``table`` hold the checks and plumbing the commands share;
``errors`` is the CLI's wording of mistakes.
"""

from ptq4vm_jax.cli.demo import ASSETS
from ptq4vm_jax.cli.main import build_parser, main, run

__all__ = ["ASSETS", "build_parser", "main", "run"]
