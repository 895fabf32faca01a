"""Progress: a tqdm bar on a terminal, a few plain lines in a log file or a pipe."""

import io
import os
import re

import pytest

from ptq4vm_jax import progress
from ptq4vm_jax.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place():
    term = Terminal()
    with progress_bar(40, "work", unit="step", stream=term) as bar:
        for _ in range(40):
            bar.set_postfix(loss="0.5")
            bar.update()
    out = term.getvalue()
    assert out.count("\r") >= 2 and out.count("\n") == 1  # redrawn in place, one line left at the end
    assert "40/40" in out and "loss=0.5" in out


def test_a_pipe_gets_one_plain_line_per_tenth():
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream, progress_bar(1000, "work", unit="img", stream=stream) as bar:
        assert not stream.isatty()
        for _ in range(1000):
            bar.set_postfix(top1="50.00")
            bar.update()
    with os.fdopen(read) as f:
        lines = f.read().splitlines()
    assert "\r" not in "".join(lines) and len(lines) == 10
    assert [line.split()[1] for line in lines] == [f"{k * 100}/1000" for k in range(1, 11)]
    assert lines[4].startswith("work: 500/1000 img (50%), ") and lines[4].endswith(" top1=50.00")


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()])
def test_every_line_drawn_shows_the_values_of_its_own_count(stream):
    """set_postfix before update: the values go with the units that update adds, and nothing is
    drawn between the two calls (a line with the old count and the new values)."""
    with progress_bar(5, "eval", unit="img", lines=5, stream=stream) as bar:
        for k in range(1, 6):
            bar.set_postfix(done=k)
            bar.update()
    drawn = re.findall(r"(\d)/5[^\r\n]*done=(\d)", stream.getvalue())
    assert drawn and drawn[-1] == ("5", "5")
    assert all(count == done for count, done in drawn), drawn


def test_lines_and_leave_control_what_a_log_gets():
    log = io.StringIO()
    with progress_bar(8, "JLSS layers_0", lines=0, stream=log) as bar:  # the caller logs its block
        bar.update(8)
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("JLSS layers_0: 8/8 it (100%)")
    log = io.StringIO()
    with progress_bar(8, "JLSS layers_0", lines=0, leave=False, stream=log) as bar:
        bar.update(8)
    assert log.getvalue() == ""
    log = io.StringIO()
    bar = progress_bar(3, "eval", lines=3, stream=log)
    for _ in range(3):
        bar.update()
    bar.close()
    bar.close()  # (a second close, e.g. from a finally, adds nothing)
    assert len(log.getvalue().splitlines()) == 3  # the last tick was the end: no extra line


def test_an_unknown_total_prints_by_time(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    with progress_bar(None, "eval", unit="img", interval=60, stream=log) as bar:
        for _ in range(10):
            now[0] += 25  # an update every 25 s: a line at 75 s, 150 s, 225 s
            bar.update(4)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["eval: 12 img", "eval: 24 img", "eval: 36 img",
                                                      "eval: 40 img"]


def test_a_slow_loop_with_a_known_total_is_not_silent_for_long(monkeypatch):
    """A calibration block's steps (lines=0: the caller logs the block) still print a line each
    time ``interval`` seconds have passed, so a log shows a long block is moving."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    with progress_bar(10, "JLSS layers_0", unit="step", lines=0, leave=False, interval=60,
                      stream=log) as bar:
        for k in range(10):
            now[0] += 25  # a step every 25 s: a line at 75 s, 150 s and 225 s (steps 3, 6, 9)
            bar.set_postfix(loss=f"{1 / (k + 1):.3f}")
            bar.update()
    assert log.getvalue().splitlines() == ["JLSS layers_0: 3/10 step (30%), 75s loss=0.333",
                                           "JLSS layers_0: 6/10 step (60%), 150s loss=0.167",
                                           "JLSS layers_0: 9/10 step (90%), 225s loss=0.111"]
    log = io.StringIO()  # fast steps: nothing between the caller's lines
    with progress_bar(10, "JLSS layers_0", unit="step", lines=0, leave=False, interval=60,
                      stream=log) as bar:
        for _ in range(10):
            now[0] += 1
            bar.update()
    assert log.getvalue() == ""


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()])
def test_disabled_progress_writes_nothing(stream):
    with progress_bar(5, "eval", enabled=False, stream=stream) as bar:
        bar.update(5)
    assert stream.getvalue() == ""


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()])
@pytest.mark.parametrize("enabled", [True, False])
def test_an_exception_in_the_loop_still_closes_the_bar(stream, enabled):
    bar = progress_bar(5, "JLSS layers_0", leave=False, enabled=enabled, stream=stream)
    with pytest.raises(KeyboardInterrupt), bar:
        bar.update()
        raise KeyboardInterrupt
    assert bar.closed
