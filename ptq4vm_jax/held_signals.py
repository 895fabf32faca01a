"""Ctrl-C and SIGTERM held back while a write finishes or is undone, then delivered."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[Callable[[], bool]]:
    """Within the block, SIGINT and SIGTERM are recorded instead of handled, and the block gets a
    function that says whether one came, so that it can undo its write rather than publish it.
    On leaving, the handlers in place before are restored and the first signal held is raised
    again through them (Ctrl-C: ``KeyboardInterrupt``; SIGTERM: whatever its handler does).

    Why: an exception raised in the middle of an Orbax save leaves its background writers racing
    the cleanup of the half-written directory, and one raised between the two renames of a swap
    leaves no directory at all. Only the main thread can set handlers; elsewhere the block runs
    unchanged (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in _HELD}
    try:
        yield lambda: bool(held)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])
