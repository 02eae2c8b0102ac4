"""SIGTERM / SIGINT: finish the step, save, exit cleanly; a second signal aborts.

The handler only sets `requested`. Ranks agree on it without a collective of their own: the
trainer adds the flag to the reduction it already does every `trainer.signal_check_iter` /
`logging_iter` steps, so all ranks stop at the same step.
"""

from __future__ import annotations

import signal
import threading

from cosmos_train.runtime.distributed import log

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Installs the handlers for the duration of a `with` block."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now, the last committed checkpoint stays valid
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        self.requested = True
        log(f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting "
            "(send it again to abort)")

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
