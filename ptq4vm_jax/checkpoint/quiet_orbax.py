"""Keep a failed Orbax read to our one error line: no late tracebacks from its background reads."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Iterator
from typing import Any


def _drop_closed_loop_noise(unraisable: Any, *, previous: Any) -> None:
    if unraisable.object is None and unraisable.exc_type is RuntimeError \
            and str(unraisable.exc_value) == "Event loop is closed":
        return
    previous(unraisable)


class _LateReadFailures(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" for reads of trees already refused."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(("Task exception was never retrieved",
                                           "Future exception was never retrieved")):
            return True
        text = record.getMessage()
        return not any(f'"{path}/"' in text or f'"{path}"' in text for path in self.refused)


_late_read_failures = _LateReadFailures()


class _NoMetadataWarning(logging.Filter):
    """Orbax's warning before the damaged-metadata error we raise ourselves says the same, less clearly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to get item metadata from directory")


@contextlib.contextmanager
def quiet_late_orbax_callbacks(tree_path: str) -> Iterator[None]:
    """Keep a failed Orbax read of ``tree_path`` to our one-line error.

    Orbax runs each operation on a fresh asyncio loop and closes it as soon as one read fails;
    TensorStore reads still in flight then complete later than the error reaches the caller, from
    TensorStore's threads: onto the closed loop ("Event loop is closed" unraisables) or as failed
    tasks and futures nobody awaits (asyncio logs each "... exception was never retrieved" when
    it is collected). Up to dozens of tracebacks would follow our error. Those reads have nothing left
    to do, so after a failure both filters stay, for this tree only (anything else still reaches
    the previous hook and the log); after a success none are pending.
    """
    previous = sys.unraisablehook
    if getattr(previous, "func", None) is not _drop_closed_loop_noise:
        sys.unraisablehook = functools.partial(_drop_closed_loop_noise, previous=previous)
    absl_log, quiet_metadata = logging.getLogger("absl"), _NoMetadataWarning()
    absl_log.addFilter(quiet_metadata)
    try:
        yield
    except BaseException:
        _late_read_failures.refused.add(tree_path.rstrip("/"))
        asyncio_log = logging.getLogger("asyncio")
        if _late_read_failures not in asyncio_log.filters:
            asyncio_log.addFilter(_late_read_failures)
        raise
    else:
        sys.unraisablehook = previous
    finally:
        absl_log.removeFilter(quiet_metadata)

