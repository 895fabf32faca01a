"""``signals_held``: Ctrl-C and SIGTERM wait for the block, are then raised through the handlers
that were in place, and the handlers come back."""

import os
import signal
import threading

import pytest

from ptq4vm_jax.held_signals import signals_held


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own SIGINT handler (a test runner's worker may have set another), given back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Stopped(Exception):
    pass


def test_a_signal_waits_for_the_block_then_goes_to_the_previous_handler():
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        ran = []
        with pytest.raises(Stopped):
            with signals_held() as interrupted:
                assert not interrupted()
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)  # only the first one held is raised again
                ran.append(interrupted())
        assert ran == [True] and seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nothing_is_raised_without_a_signal_and_ctrl_c_is_keyboard_interrupt():
    with signals_held() as interrupted:
        pass
    assert not interrupted()
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)


def test_off_the_main_thread_the_block_runs_unchanged():
    got = []

    def work():
        with signals_held() as interrupted:
            got.append(interrupted())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert got == [False] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
