"""What each rank wrote for a checkpoint, gathered for the manifest without a collective.

Every rank reports the files it wrote (names and sizes), once they are durable, through the
process group's key-value store; rank 0 writes the manifest from these reports. A directory
listing is not used: on a network file system it can miss another node's new files or show
their old sizes. No collective is involved, so rank 0 can commit a background save from a
thread as soon as the last rank's files are on disk, while training goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

_PREFIX = "vitscale/checkpoint"


def _default_store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


class SaveReports:
    def __init__(self, rank: int, world_size: int, timeout_s: float = 1800.0):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self._local: dict[str, dict] = {}  # one process: no store needed

    def _store(self):
        return _default_store() if self.world_size > 1 and dist.is_initialized() else None

    def publish(self, folder: Path, written: list[Path], error: str | None) -> None:
        """This rank's report for `folder`: the files it wrote (durable by now), or its error."""
        body = {"error": error} if error else {"files": {str(Path(p).relative_to(folder)): Path(p).stat().st_size
                                                         for p in written}}  # fmt: skip
        store = self._store()
        if store is None:
            self._local[folder.name] = body
        else:
            store.set(f"{_PREFIX}/{folder.name}/{self.rank}", json.dumps(body))

    def collect(self, folder: Path) -> dict[str, int] | None:
        """Rank 0: every rank's files of `folder` once all have reported; None when one reported an error."""
        store = self._store()
        if store is None:
            bodies = [self._local.pop(folder.name)]
        else:
            keys = [f"{_PREFIX}/{folder.name}/{r}" for r in range(self.world_size)]
            _wait_for(store, keys, self.timeout_s)
            bodies = [json.loads(store.get(k)) for k in keys]
            for k in keys:
                store.delete_key(k)
        if any("error" in b for b in bodies):
            return None  # each failed rank says why itself
        files: dict[str, int] = {}
        for b in bodies:
            files.update(b["files"])
        return dict(sorted(files.items()))


def _wait_for(store, keys: list[str], timeout_s: float) -> None:
    """Poll until every key is set. The store's own blocking `wait` would hold the client
    this process shares with its writer thread, whose report is among the keys."""
    deadline, pause = time.monotonic() + timeout_s, 0.01
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [k.rsplit("/", 1)[-1] for k in keys if not store.check([k])]
            raise TimeoutError(f"no report from rank(s) {', '.join(missing)} after {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
