"""The progress watchdog: a rank that stops making progress leaves with EXIT_HUNG.

A rank stuck on a dead peer or a hung file system would otherwise idle until the
wall-clock limit. The watchdog thread notices that no step has finished for `timeout_s`
and ends the process with a message naming the step. The job script requeues a hang once
(other nodes may get past it), not again. A peer that failed with an error is the failure
watch's (pretrain/runtime/fatal.py), which ends every rank within seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from vitscale_common.exit_codes import EXIT_HUNG


class Watchdog:
    """Exits the process with EXIT_HUNG when `beat()` has not been called for timeout_s."""

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
                    f"(limit {self.timeout_s:.0f} s); exiting with {EXIT_HUNG}: the job is requeued from its "
                    "last checkpoint once, and ends at a second hang",
                    file=sys.stderr,
                    flush=True,
                )
                # A hung collective cannot be interrupted politely; leave now.
                os._exit(EXIT_HUNG)
