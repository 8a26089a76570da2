"""How a run ends: FINISHED on success, FAILED on any exception (config errors included), KILLED on Ctrl-C or
SIGTERM, whichever way Lightning turned them into exceptions on the way out."""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
#: the exit code of a process ended by SIGTERM, given back when the signal was swallowed on the way
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class JobTerminated(BaseException):
    """Raised from the SIGTERM handler so the job unwinds like on Ctrl-C and its run ends KILLED."""


class RunStatus:
    """The status the run will be closed with (`value`, FAILED until the job completes).

    `sigterm_guard()` turns SIGTERM into JobTerminated and remembers that it came: a signal that lands in a
    garbage-collector callback is swallowed by Python, and Lightning then stops with a plain SystemExit at the end
    of the epoch. `recorded()` wraps the job and sets `value` from how it left, before the caller's clean-up reads
    it; every exception goes on up unchanged (a swallowed SIGTERM becomes SystemExit(143))."""

    def __init__(self) -> None:
        self.value = FAILED
        self.sigterm_received = False

    @contextlib.contextmanager
    def sigterm_guard(self) -> Iterator[None]:
        def handler(signum, frame):  # noqa: ARG001
            self.sigterm_received = True
            raise JobTerminated(f"received signal {signum}")

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def recorded(self) -> Iterator[None]:
        try:
            yield
            self.value = FINISHED
            if self.sigterm_received:  # the signal was swallowed on the way: the job still did not complete
                self.value = KILLED
                raise SystemExit(SIGTERM_EXIT_CODE)
        except (KeyboardInterrupt, JobTerminated):
            self.value = KILLED
            raise
        except SystemExit as e:  # Lightning turns Ctrl-C into sys.exit(1), SIGTERM into SIGTERMException
            # (the SystemExit raised just above lands here too, and stays KILLED)
            clean_exit = e.code in (0, None)
            self.value = FINISHED if clean_exit and not self.sigterm_received else KILLED
            if self.sigterm_received and clean_exit:
                raise SystemExit(SIGTERM_EXIT_CODE) from e
            raise
