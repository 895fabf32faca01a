"""``stop_on_signals``: Ctrl-C and SIGTERM stop a command even when they land where Python
drops exceptions (a garbage-collector callback, which jax registers; a weakref callback)."""

import gc
import os
import signal
import time
import weakref

import pytest

from ptq4vm_jax.cli.signals import Terminated, stop_on_signals


class _Object:
    pass


def _signal_in_a_gc_callback(signum):
    sent = []

    def callback(phase, info):
        if phase == "start" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    return sent


def _signal_in_a_weakref_callback(signum):
    sent = []

    def callback(ref):
        sent.append(True)
        os.kill(os.getpid(), signum)
        time.sleep(0.01)

    obj = _Object()
    ref = weakref.ref(obj, callback)
    del obj  # the callback runs now
    assert ref() is None
    return sent


@pytest.mark.parametrize("where", [_signal_in_a_gc_callback, _signal_in_a_weakref_callback])
@pytest.mark.parametrize("signum, stops_with", [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, Terminated)])
def test_a_signal_whose_exception_is_dropped_still_stops_the_command(where, signum, stops_with):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(stops_with):
        with stop_on_signals():
            sent = where(signum)
            for _ in range(100):  # the command runs on; the signal must still stop it
                time.sleep(0.01)
    assert sent == [True]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_outside_a_callback_the_signal_stops_at_once():
    with pytest.raises(Terminated):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not stop the block")
