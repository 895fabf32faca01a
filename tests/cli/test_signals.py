"""``stop_on_signals``: Ctrl-C and SIGTERM stop a command even when they land inside a garbage
collector callback (jax registers one), where a raised exception would be dropped."""

import gc
import os
import signal
import time

import pytest

from ptq4vm_jax.cli.signals import Terminated, stop_on_signals


@pytest.mark.parametrize("signum, stops_with", [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, Terminated)])
def test_a_signal_inside_a_gc_callback_still_stops_the_command(signum, stops_with):
    sent = []

    def callback(phase, info):  # the signal arrives while the collector runs this
        if phase == "start" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # the handler runs here, inside the callback

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    gc.callbacks.append(callback)
    try:
        with pytest.raises(stops_with):
            with stop_on_signals():
                gc.collect()
                for _ in range(100):  # the command runs on; the signal must still stop it
                    time.sleep(0.01)
    finally:
        gc.callbacks.remove(callback)
    assert sent == [True]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_outside_a_callback_the_signal_stops_at_once():
    with pytest.raises(Terminated):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not stop the block")
