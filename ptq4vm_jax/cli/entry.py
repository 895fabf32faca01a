"""The ``ptq4vm`` console command: Ctrl-C and SIGTERM are in hand from its first instant.

Loading the library (jax, flax, orbax) takes seconds. Python's default Ctrl-C in that time is a
traceback, or nothing at all where the exception lands in a garbage-collector callback (jax
registers one) and is dropped. So ``run`` holds the signals (``stop_on_signals``) before it
loads ``main``, which is why that import is inside the function, and until ``main`` returns.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from ptq4vm_jax.cli.signals import Terminated, stop_on_signals


def _leave(code: int) -> None:
    """End the process now, its output flushed, without the interpreter's teardown: Ctrl-C can
    land while XLA compiles on one of its worker threads (jax waits for a compile
    interruptibly), and tearing the interpreter down under that thread crashes the process with a
    segmentation fault. The command's own clean-up has run as the interrupt unwound. A stream
    that cannot be flushed (a pipe whose reader Ctrl-C ended too) loses its last lines, not the
    exit status."""
    for flush in (logging.shutdown, sys.stdout.flush, sys.stderr.flush):
        try:
            flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run() -> None:
    """``main``, loaded and run under ``stop_on_signals``; an interrupted command (exit 130 or
    143) ends at once (``_leave``)."""
    try:
        with stop_on_signals():
            from ptq4vm_jax.cli.app import main

            main()
    except KeyboardInterrupt as e:  # while loading; under PTQ4VM_DEBUG=1 also from ``main``
        killed = isinstance(e, Terminated)
        if os.environ.get("PTQ4VM_DEBUG"):
            traceback.print_exc()
        else:
            print(f"ptq4vm: {'terminated (SIGTERM)' if killed else 'interrupted'}", file=sys.stderr)
        _leave(143 if killed else 130)
    except SystemExit as e:
        if isinstance(e.code, int) and e.code in (130, 143):
            _leave(e.code)
        raise
