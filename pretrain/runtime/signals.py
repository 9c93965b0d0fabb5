"""Preemption: save, then exit with a code the job script requeues on.

SLURM sends SIGUSR1 (`--signal`) or SIGTERM before a time-out or preemption. A handler
only records the request; at the next step boundary the ranks all-reduce the flag, so
they all save the same step together (a save that only some ranks enter would hang).
"""

from __future__ import annotations

import signal


class StopRequest:
    """Remembers SIGUSR1 / SIGTERM until the training loop asks at a step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
