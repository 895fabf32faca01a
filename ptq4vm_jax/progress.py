"""Progress of a long loop that stays readable wherever it goes.

On a terminal, a tqdm bar redrawn in place. Anywhere else (stderr redirected to a log file, as
under a scheduler, or a pipe), redrawing would write a carriage-return line per update into the
log, so a few plain lines are printed instead: one each time another ``1/lines`` of a known total
is done, and one whenever ``interval`` seconds have passed since the last (so a slow loop is never
silent for long), and a last one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """The calls a loop makes: ``update(n)``, ``set_postfix(**values)`` and ``close()`` (also as
    a context manager). This base class draws nothing (progress turned off). ``closed`` says
    whether ``close()`` ran (a loop stopped by an exception must still close its bar, or the
    next message lands on the half-drawn line).

    ``set_postfix`` draws nothing: it sets the values shown from the next ``update`` (or the
    ``close``) on, so a loop calls it before ``update`` with the values that hold once the new
    units are counted, and every drawn line shows a count and the values of that count."""

    closed = False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bar(Progress):
    """A tqdm bar (the terminal)."""

    def __init__(self, total: int | None, desc: str, unit: str, leave: bool, stream: TextIO) -> None:
        from tqdm import tqdm  # only where a bar is drawn: logs, pipes and quiet runs need none

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(refresh=False, **values)  # drawn by the update that follows

    def close(self) -> None:
        self.bar.close()
        self.closed = True


class _Lines(Progress):
    """Plain lines (a log file or a pipe)."""

    def __init__(self, total: int | None, desc: str, unit: str, leave: bool, stream: TextIO,
                 lines: int, interval: float) -> None:
        self.total, self.desc, self.unit, self.leave, self.stream = total, desc, unit, leave, stream
        self.lines, self.interval = lines, interval
        self.done = self.said = 0  # units done, and done when the last line was printed
        self.step = 0  # for a known total: lines printed so far
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()

    def _line(self) -> None:
        of = "" if not self.total else f"/{self.total}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.done}{of} {self.unit}{pct}, {time.monotonic() - self.start:.0f}s{extra}",
              file=self.stream, flush=True)
        self.said, self.last = self.done, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total and self.lines > 0:
            due = min(self.lines, self.done * self.lines // self.total)
            if due > self.step:
                self.step = due
                self._line()
                return
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.done != self.said:
            self._line()


def progress_bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True,
                 leave: bool = True, lines: int = 10, interval: float = 60.0,
                 stream: TextIO | None = None) -> Progress:
    """Progress over ``total`` units (None: unknown), written to ``stream`` (default: stderr).

    ``enabled=False`` draws nothing. A terminal gets a tqdm bar (``leave=False``: erased when
    closed). Elsewhere ``lines`` plain lines evenly spaced over a known total, plus one at the
    first update ``interval`` seconds after the last line (the only lines over an unknown total),
    then a last line at ``close()`` when ``leave`` and the last one printed was not already the
    end. ``lines=0`` keeps only the lines ``interval`` apart and that last one, for a loop whose
    caller logs its own line per block.
    """
    if not enabled:
        return Progress()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return _Bar(total, desc, unit, leave, stream)
    return _Lines(total, desc, unit, leave, stream, lines, interval)
