"""One rank's fatal error ends every rank within seconds, whatever the transport.

When a rank raises, its peers are usually inside a collective it will never join. Gloo
notices the closed sockets once the failed process is gone; NCCL does not, and waits
for its timeout (30 min by default), after which the watchdog's exit code would even
get the job requeued into the same failure. So the failing rank writes its error into
the process group's key-value store (and the run directory, for `vit-submit status`),
and a thread on every rank polls the store: on seeing the error it prints it and ends
its process with EXIT_FATAL, which the job script never requeues. Losing the store
itself (it lives in rank 0's process) means rank 0 is gone: that is fatal too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from vitscale_common.atomic import atomic_write_text
from vitscale_common.exit_codes import EXIT_FATAL, FAILURE_FILE

_KEY, _SEEN = "vitscale/fatal", "vitscale/fatal_seen"


def _default_store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def failure_text(error: BaseException) -> str:
    """One line: the exception and where it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}".replace("\n", " ")


class FailureWatch:
    """Tells every rank when one fails, and ends the others with EXIT_FATAL.

    Used as a context manager around a rank's work, inside the process group's lifetime:
    an exception leaving it is recorded (with `step()`, the last step the rank completed)
    and goes on up. Leave it before the process group is shut down, so a rank that
    finished first and took the store with it is not mistaken for a failure. `run_dir`:
    where failure.json goes (None: nowhere).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        run_dir: Path | None,
        step: Callable[[], int | None] = lambda: None,
        poll_s: float = 1.0,
        ack_s: float = 5.0,
    ):
        self.rank, self.world_size, self.run_dir, self.step = rank, world_size, run_dir, step
        self.poll_s, self.ack_s = poll_s, ack_s
        self._recorded = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)

    def __enter__(self) -> "FailureWatch":
        if self.rank == 0 and self.run_dir is not None:
            (self.run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's
        if self.world_size > 1:
            self._thread.start()
        return self

    def __exit__(self, kind, error, traceback_) -> bool:
        if error is not None:
            self.record(error, self.step())  # every other rank ends within seconds
        self._stop.set()
        return False

    def record(self, error: BaseException, step: int | None) -> None:
        """Publish this rank's error to every rank and the run directory, and give the others
        a moment to read it (the store goes with rank 0's process)."""
        where = f" after step {step}" if step is not None else ""
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        failure = {
            "rank": self.rank,
            "host": host,
            "step": step,
            "error": failure_text(error),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "message": f"rank {self.rank} ({host}) failed{where}: {failure_text(error)}",
        }
        self._recorded = True
        try:
            if self.run_dir is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / FAILURE_FILE, json.dumps(failure) + "\n")
        except OSError as e:  # the error being reported matters more
            print(f"could not write {self.run_dir / FAILURE_FILE}: {e}", file=sys.stderr)
        if self.world_size == 1 or self._stop.is_set():
            return
        try:
            store = _default_store()
            store.compare_set(_KEY, "", json.dumps(failure))  # the first failure wins
        except Exception as e:  # noqa: BLE001 - rank 0's store may be gone already
            print(f"could not tell the other ranks through the store: {e}", file=sys.stderr)
            return
        deadline = time.monotonic() + self.ack_s
        try:
            while time.monotonic() < deadline and int(store.add(_SEEN, 0)) < self.world_size - 1:
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - rank 0 read it and left, taking the store along
            pass

    def _watch(self) -> None:
        store = _default_store()
        while not self._stop.wait(self.poll_s):
            if self._recorded:
                return  # this rank failed: its own error is on its way out
            try:
                failure = json.loads(store.get(_KEY)) if store.check([_KEY]) else None
                if failure is not None and failure["rank"] != self.rank:
                    store.add(_SEEN, 1)
            except Exception as e:  # noqa: BLE001 - any store error means rank 0 is unreachable
                if self._stop.is_set() or self._recorded:
                    return
                self._exit(f"lost the rendezvous store on rank 0 ({type(e).__name__}: {e}); rank 0 has ended")
            if failure is not None and not (self._stop.is_set() or self._recorded):
                self._exit(failure["message"])

    def _exit(self, why: str) -> None:
        print(
            f"fatal: {why}; rank {self.rank} exits with {EXIT_FATAL} (the job is not requeued: "
            f"fix the cause, then submit again to resume from the last checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        # This rank may be inside a collective that will never complete; leave now.
        os._exit(EXIT_FATAL)
