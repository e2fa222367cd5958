"""Stopping a run cleanly: SIGINT/SIGTERM ask for a checkpoint at the next iteration boundary."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

from epamx import distributed as D

__all__ = ["StopFlag", "stop_on_signals"]


@dataclass
class StopFlag:
    """Set by a signal handler (or anything else); the loop saves a checkpoint at the next iteration boundary."""
    requested: bool = False
    reason: str = ""

    def request(self, reason: str = "requested") -> None:
        self.reason = self.reason or reason
        self.requested = True


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """While inside, SIGINT/SIGTERM set ``flag`` instead of killing the process; a second one stops at once
    (KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag.requested:
            raise KeyboardInterrupt(f"{name} again: stopping without a checkpoint")
        flag.request(name)
        if D.is_main():
            print(f"\n{name}: saving a checkpoint after this iteration, then stopping "
                  f"(send it again to quit at once)", file=sys.stderr, flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
