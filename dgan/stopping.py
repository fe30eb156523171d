"""Stop signals for a training run: SIGTERM/SIGUSR1 (preemption) and SIGINT (Ctrl-C).

A step takes well under a second, so a signal is normally acted on at the next step boundary: the
trainer saves a checkpoint and exits with EXIT_PREEMPTED (SLURM requeues on it) or EXIT_INTERRUPTED.
A sample grid or a periodic evaluation can take minutes on a CPU, longer than SLURM's notice before
SIGKILL; those run through `StopFlag.run_phase`, which aborts them at once.
"""
from __future__ import annotations

import signal
from typing import Callable, Optional, TypeVar

from dgan import distributed as dist

T = TypeVar("T")
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: "try again" -- slurm/train.sh requeues on it
EXIT_INTERRUPTED = 130


class PhaseInterrupted(BaseException):
    """Raised by the signal handler inside an interruptible phase. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` in the sampling or metric code swallows it."""


class StopFlag:
    """Set by a stop signal; the trainer acts on it at a step boundary, or at once inside `run_phase`."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._armed = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    @property
    def ctrl_c(self) -> bool:
        return self.signum == signal.SIGINT

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            then = "stopping the current phase to save" if self._armed else "saving at the next step boundary"
            dist.print_rank(f"received {signal.Signals(signum).name}; {then} a checkpoint")
        if self._armed:
            self._armed = False  # disarm first: a second signal must not raise again
            raise PhaseInterrupted(signal.Signals(signum).name)

    def run_phase(self, phase: Callable[[], T], interruptible: bool = True) -> Optional[T]:
        """phase(), or None when a stop signal came before or during it.

        Only for work whose abortion loses nothing the checkpoint needs: sampling and metrics, on
        their own RNG, outside the training state. And only rank-local work: a rank interrupted
        outside a collective would leave its peers waiting inside one, so a multi-rank evaluation
        passes interruptible=False and is acted on after it ends.
        """
        if self.signum is not None:
            return None  # a stop is pending: save first, skip the phase
        try:
            self._armed = interruptible
            try:
                return phase()
            finally:
                self._armed = False
        except PhaseInterrupted:  # also when the signal lands in the `finally` above
            return None
