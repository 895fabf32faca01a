"""``stop_on_signals``: Ctrl-C and SIGTERM stop a command even when they land where Python
drops exceptions (a garbage-collector callback, which jax registers; a weakref callback); ``run``:
an interrupted command's process ends at once."""

import gc
import os
import signal
import subprocess
import sys
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


_RUN = """
import importlib, sys, threading, time
app = importlib.import_module("ptq4vm_jax.cli.app")
entry = importlib.import_module("ptq4vm_jax.cli.entry")

def command():
    threading.Thread(target=time.sleep, args=(60,)).start()  # XLA's compile thread, say
    print("started")  # buffered: stdout is a pipe
    if sys.argv[2] == "reader gone":
        time.sleep(1)  # while the test closes the pipe's reading end
    raise SystemExit(int(sys.argv[1]))

app.main = command
entry.run()
"""


@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_command_leaves_without_waiting_for_background_work(code):
    """Interrupted, ``run`` ends the process at once with its output flushed: tearing the
    interpreter down under a thread XLA is still compiling on crashes it. (The interpreter's own
    exit would wait the thread's 60 s; other exits take that path, as ``python -m ... --version``
    in test_cli shows.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (stdout stays buffered)
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(code), "reading"], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:  # (a process that waited for the thread would not end within the timeout)
        out, _ = proc.communicate(timeout=40)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (code, "started\n")


def test_an_interrupted_command_whose_reader_is_gone_still_exits_130():
    """Ctrl-C also ends the reader of a pipe (``ptq4vm ... | tee log``): the output that can no
    longer be flushed is dropped, and the exit status stays 130, with nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN, "130", "reader gone"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        proc.wait(timeout=40)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "")


def test_a_hook_installed_inside_the_block_sends_no_signal_after_it(monkeypatch):
    """A hook set inside the block that wraps ours and stays (as Orbax's quieting of late reads
    does after a failed read) must not re-send a dropped Ctrl-C once the command has ended."""
    sent, seen = [], []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    with stop_on_signals():
        ours = sys.unraisablehook
        monkeypatch.setattr(sys, "unraisablehook", lambda u: ours(u))  # wraps ours, and stays
    dropped = type("Unraisable", (), {"exc_type": KeyboardInterrupt, "exc_value": KeyboardInterrupt(),
                                      "object": None})()
    sys.unraisablehook(dropped)
    time.sleep(0.2)  # (longer than the re-send's delay)
    assert sent == [] and seen == [KeyboardInterrupt]


_LOADING = """
import gc, importlib.abc, os, signal, sys, time
import ptq4vm_jax.cli.entry as entry

class SlowLoad(importlib.abc.MetaPathFinder):  # Ctrl-C while the library loads
    def find_spec(self, name, path, target=None):
        if name == "ptq4vm_jax.cli.app":
            if sys.argv[1] == "gc":  # where jax's garbage-collector callback drops the exception
                def callback(phase, info):
                    gc.callbacks.remove(callback)
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
                gc.callbacks.append(callback)
                gc.collect()
            else:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(20)
            print("ran on")
        return None

sys.meta_path.insert(0, SlowLoad())
entry.run()
"""


@pytest.mark.parametrize("where", ["import", "gc"])
def test_ctrl_c_while_the_library_loads_is_one_line(where):
    """The console command holds Ctrl-C before it loads the library: one line and 130, never a
    traceback, and never lost in a garbage-collector callback (the command would run on)."""
    proc = subprocess.run([sys.executable, "-c", _LOADING, where], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "ptq4vm: interrupted\n")


def test_with_ptq4vm_debug_an_interrupt_shows_its_traceback_and_keeps_its_status():
    env = {**os.environ, "PTQ4VM_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOADING, "import"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 130
    assert proc.stderr.startswith("Traceback") and proc.stderr.rstrip().endswith("KeyboardInterrupt")
