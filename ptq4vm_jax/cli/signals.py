"""Ctrl-C and SIGTERM stop a command, and neither is lost."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

# How long a signal whose exception was dropped waits to be sent again.
_RETRY_SECONDS = 0.05


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM inside ``stop_on_signals``: the run stops where it is, the completed
    blocks stay in --resume, and ``main`` says so (exit status 143)."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``.

    Python runs a signal handler wherever the main thread is, and an exception raised inside a
    garbage-collector callback (jax registers one), a weakref callback or a ``__del__`` is
    dropped with an "Exception ignored" line: the command would run on. Such a dropped stop
    reaches ``sys.unraisablehook``, which here sends the signal again a moment later, once that
    callback has returned. The previous handlers and hook are restored after, and a hook installed
    inside the block that still calls this one (Orbax's quieting of late reads) reaches the
    previous hook only. Only the main thread can set handlers; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    previous_hook = sys.unraisablehook
    inside = [True]  # a hook installed inside the block may keep calling ``dropped`` after it

    def dropped(unraisable: Any) -> None:
        kind = unraisable.exc_type
        if inside[0] and kind is not None and issubclass(kind, KeyboardInterrupt):
            signum = signal.SIGTERM if issubclass(kind, Terminated) else signal.SIGINT
            threading.Timer(_RETRY_SECONDS, os.kill, (os.getpid(), signum)).start()
            return
        previous_hook(unraisable)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = dropped
    try:
        yield
    finally:
        inside[0] = False
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if sys.unraisablehook is dropped:  # (a hook installed inside the block stays)
            sys.unraisablehook = previous_hook
