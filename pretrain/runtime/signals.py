"""Preemption and hang handling: save, then exit with a code the job script requeues on.

SLURM sends SIGUSR1 (`--signal`) or SIGTERM before a time-out or preemption. A handler
only records the request; at the next step boundary the ranks all-reduce the flag, so
they all save the same step together (a save that only some ranks enter would hang).

A rank that stops making progress (a dead peer, a stuck file system) would otherwise idle
until the wall-clock limit. The watchdog thread notices that no step has finished for
`timeout_s` and ends the process with the requeue code and a message naming the step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# "Checkpoint saved (or nothing lost), start me again": the SLURM template requeues on it.
EXIT_REQUEUE = 85


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


class Watchdog:
    """Exits the process with EXIT_REQUEUE when `beat()` has not been called for timeout_s."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self._last = step, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(10.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"watchdog: rank {self.rank} made no progress for {idle:.0f} s after step {self.step} "
                    f"(limit {self.timeout_s:.0f} s); exiting with {EXIT_REQUEUE} so the job is requeued "
                    "from its last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                # A hung collective cannot be interrupted politely; leave now.
                os._exit(EXIT_REQUEUE)
