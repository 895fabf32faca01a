"""What calibration reports: a summary per stage, and the error that stops it. A leaf module, so
that the resume state (``resume``, which the loop ``jlss`` imports) needs nothing from the loop."""

from __future__ import annotations

import dataclasses


class CalibrationError(RuntimeError):
    """Calibration cannot go on (non-finite values); the message names the stage."""


@dataclasses.dataclass
class StageReport:
    """``loss_learned``: after JLSS (None without learning, or when it diverged); ``loss_final``:
    of the state kept, the initial one where learning raised the loss (or diverged) and
    ``cfg.revert_worse`` is on."""

    name: str
    loss_init: float
    loss_final: float
    seconds: float
    loss_learned: float | None = None
    reverted: bool = False
