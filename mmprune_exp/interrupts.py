"""SIGTERM and SIGINT as an exception, so a job stopped by SLURM (preemption, time limit) or Ctrl-C unwinds.

Python's default SIGTERM action kills the process outright: no ``finally`` runs, the log never says why,
and the W&B run is left open. Inside :func:`signals_as_exceptions` both signals raise :class:`Interrupted`
in the main thread, so the run can log it, finish its tracker with a failing exit code and keep the
samples written so far; a rerun into the same directory resumes from them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A handled signal arrived. A BaseException (like KeyboardInterrupt): ``except Exception`` cannot eat it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Raise :class:`Interrupted` on the first SIGTERM/SIGINT; later ones (SLURM repeats them) are logged
    and ignored so the cleanup they interrupt can finish. The previous handlers come back on exit."""
    fired = []

    def handler(signum, frame):
        if fired:
            log.warning("%s again while shutting down; still finishing up", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
