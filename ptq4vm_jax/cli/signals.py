"""Ctrl-C and SIGTERM stop a command, and neither is lost."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# How long a signal that arrived inside a garbage-collector callback waits to be raised again.
_RETRY_SECONDS = 0.05


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM inside ``stop_on_signals``: the run stops where it is, the completed
    blocks stay in --resume, and ``main`` says so (exit status 143)."""


def _in_gc_callback(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a callback of the garbage collector (jax registers one).
    An exception raised there is printed as "Exception ignored" and dropped, not propagated."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``. A signal
    that lands inside a garbage-collector callback, where the exception would be dropped and the
    command would run on, is sent again a moment later, once the callback has returned. The
    previous handlers are restored after. Only the main thread can set handlers; elsewhere the
    block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        if _in_gc_callback(frame):
            threading.Timer(_RETRY_SECONDS, os.kill, (os.getpid(), signum)).start()
            return
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
