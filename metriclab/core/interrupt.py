"""Ctrl-C that Python swallowed: the SIGINT handler records every Ctrl-C here, and long loops re-raise it.

Python runs a signal handler between bytecodes of whatever code is executing; when that is a garbage-collection or
weakref callback (SQLAlchemy registers some), the KeyboardInterrupt it raises is printed as "Exception ignored in
..." and dropped, and the job goes on as if nothing happened (seen: a training ran on after Ctrl-C). The entry's
handler calls `record()`; a loop that checks `pending()` at its steps (training's batch boundaries) raises the
interrupt again there.
"""
from __future__ import annotations

import threading

_received = threading.Event()


def record() -> None:
    """A Ctrl-C came (called by the SIGINT handler, before it raises KeyboardInterrupt)."""
    _received.set()


def pending() -> bool:
    """Whether a Ctrl-C came in this process."""
    return _received.is_set()


def raise_if_pending() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C came: at a loop's step, where it cannot be swallowed."""
    if _received.is_set():
        raise KeyboardInterrupt


def clear() -> None:
    """Forget a recorded Ctrl-C (tests; a job started again in the same process)."""
    _received.clear()


__all__ = ["clear", "pending", "raise_if_pending", "record"]
