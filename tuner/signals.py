"""Stopping a long command (a search, a grid of runs) on Ctrl-C or SIGTERM.

Inside `Tuner.fit` the first signal asks Ray to stop as its own Ctrl-C handler does: Ray saves the
experiment and returns from `fit`, and the caller raises `Stopped`, which the command line prints
as one line with the `--resume` command (exit 128 + the signal: 130, 143).  Outside `fit`, and on
a second signal, `Stopped` is raised at once.  Left to itself, SIGTERM ran `sys.exit` (ray.init's
handler) in the middle of `fit`: a crash dump, no state saved, no resume hint.

A trial's worker is stopped the other way round: Ray kills a finished trial's actor with SIGTERM,
whose handler (Ray's) raises SystemExit.  Landing inside a weakref callback, Python cannot raise
it and prints "Exception ignored in ..." instead, which Ray forwards to the search's console;
`quiet_stops_in_callbacks` drops those lines in the worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

RAY_OWN_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # "1": Ray leaves SIGINT to us inside fit


class Stopped(KeyboardInterrupt):
    """A stop signal ended the command before its end; `signum` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def stop_on_sigterm() -> None:
    """SIGTERM raises `Stopped`, as Ctrl-C raises KeyboardInterrupt; call again after ray.init,
    which sets its own handler."""
    signal.signal(signal.SIGTERM, raise_stopped)


@contextmanager
def stopping_fit() -> Iterator[list[int]]:
    """Around `Tuner.fit`: yields the list of stop signals received, in order.  The first asks
    Ray to stop (Ray listens on SIGUSR1 while `fit` runs); one before Ray listens, or a second,
    raises `Stopped` at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        ray_stop = signal.getsignal(signal.SIGUSR1)
        if len(received) > 1 or not callable(ray_stop):
            raise Stopped(signum)
        ray_stop(signum, frame)

    before_env = os.environ.get(RAY_OWN_SIGINT)
    os.environ[RAY_OWN_SIGINT] = "1"
    before = {s: signal.signal(s, h) for s, h in
              ((signal.SIGINT, stop), (signal.SIGTERM, stop), (signal.SIGUSR1, signal.SIG_DFL))}
    try:
        yield received
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if before_env is None:
            os.environ.pop(RAY_OWN_SIGINT)
        else:
            os.environ[RAY_OWN_SIGINT] = before_env


def quiet_stops_in_callbacks() -> None:
    """In this process, an exception Python cannot raise (in a weakref callback, a `__del__`) is
    dropped when it is a stop (SystemExit, KeyboardInterrupt): the process is ending as asked;
    any other is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_stops", False):
        return

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)):
            previous(unraisable)

    hook.drops_stops = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
