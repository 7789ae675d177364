"""Clean stops on Ctrl-C (SIGINT) and SIGTERM (a cluster's preemption, `kill`).

While `catch_stop_signals()` is active, the first SIGINT or SIGTERM only records a request; the loop sees it
at the end of the current step (`requested()`), every process agrees to stop at that same step, a checkpoint
is written atomically and `TrainingInterrupted` ends the run. The app turns that into one line saying how to
continue and the shell's exit status for the signal (130 for SIGINT, 143 for SIGTERM). A second signal gets
the default behaviour back: it stops at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_EXIT_BASE = 128  # a shell reports death by signal N as exit status 128 + N

_requested: list[int] = []  # the signal numbers received while catching


class TrainingInterrupted(Exception):
    """The run stopped on a signal after `step` steps, with a checkpoint of that step in `run_dir`."""

    def __init__(self, signum: int, step: int, run_dir: Path, is_main: bool = True):
        self.signum, self.step, self.run_dir, self.is_main = signum, step, Path(run_dir), is_main
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint in {run_dir}")

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_BASE + self.signum


def requested() -> int:
    """The signal number of the first stop request received (0: none)."""
    return _requested[0] if _requested else 0


def _record(signum: int, frame) -> None:
    _requested.append(signum)
    for sig in STOP_SIGNALS:  # the next signal, of either kind, stops at once
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[None]:
    """Record SIGINT / SIGTERM instead of dying, for the duration of a run (main thread only; elsewhere,
    where Python cannot install handlers, signals keep their usual effect)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _requested.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
