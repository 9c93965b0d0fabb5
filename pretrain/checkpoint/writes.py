"""How a checkpoint's files reach the disk: each through `atomic_open`, by the rank that made
it, either at once or from a background thread.

DeepSpeed writes its shards with a plain `torch.save` and no fsync. `route_writes(engine)`
puts a stand-in for its torch checkpoint engine in place that writes every file through
`atomic_open` (temporary name, fsync, rename). Each writer thus flushes its own files.
Flushing them afterwards from a listing of the folder would race with ranks still writing,
and on shared storage a node can only flush what it wrote itself.

For a background save the stand-in keeps a host copy of each state instead. Training goes
on updating the originals in place, so they cannot be written later as they are. A
`BackgroundWrite` thread then writes the copies while training continues.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vitscale_common.atomic import atomic_open

Saver = Callable[[Any, Any], None]  # (object, open file): torch.save or DeepSpeed's own


def write_file(path: str | Path, obj: Any, save: Saver = torch.save) -> None:
    with atomic_open(path) as f:
        save(obj, f)


def host_copy(obj: Any) -> Any:
    """A copy of a state tree that in-place updates of the original cannot reach.

    Tensors become CPU copies (views become compact tensors of their own); containers keep
    their type; anything else is deep-copied.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same type, a defaultdict's factory included
        for key, value in obj.items():
            out[key] = host_copy(value)
        return out
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, tuple):
        items = [host_copy(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # named tuples take fields
    return copy.deepcopy(obj)


@dataclasses.dataclass
class PendingFile:
    path: Path
    obj: Any  # a host copy
    save: Saver = torch.save


class _AtomicWrites:
    """Stands in for DeepSpeed's torch checkpoint engine; everything but `save` is delegated."""

    def __init__(self, inner):
        self.inner = inner
        self.captured: list[PendingFile] | None = None  # a list while a background save collects
        self.written: list[Path] = []  # what a waited save wrote, for this rank's report

    def save(self, state_dict, path: str) -> None:
        if self.captured is None:
            write_file(path, state_dict, self.inner.save)  # torch.save takes a file as well as a path
            self.written.append(Path(path))
        else:
            self.captured.append(PendingFile(Path(path), host_copy(state_dict), self.inner.save))

    def preserves_storage_sharing(self) -> bool:
        # True makes DeepSpeed clone tensors itself before `save`; a capture copies them anyway.
        return self.captured is None and self.inner.preserves_storage_sharing()

    @contextlib.contextmanager
    def capturing(self, into: list[PendingFile]) -> Iterator[None]:
        self.captured = into
        try:
            yield
        finally:
            self.captured = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def route_writes(engine) -> _AtomicWrites:
    """Install the stand-in on `engine` (once) and return it."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if not isinstance(current, _AtomicWrites):
        # Our DeepSpeed config never selects another writer (Nebula, the decoupled engines).
        if not isinstance(current, TorchCheckpointEngine):
            raise TypeError(f"checkpoints need DeepSpeed's torch checkpoint engine, not {type(current).__name__}")
        engine.checkpoint_engine = current = _AtomicWrites(current)
    return current


class BackgroundWrite:
    """Writes one rank's captured files of one checkpoint in a thread, then reports them.

    `report(paths, error)` runs in the thread once every file is durable (or the writing
    failed), so the checkpoint can be committed without waiting for the training thread.
    """

    def __init__(
        self,
        folder: Path,
        step: int,
        files: list[PendingFile],
        report: Callable[[list[Path], str | None], None] | None = None,
    ):
        self.folder, self.step = folder, step
        self.error: str | None = None
        self._report = report
        self._thread = threading.Thread(target=self._run, args=(files,), name=f"save-{folder.name}", daemon=True)
        self._thread.start()

    def _run(self, files: list[PendingFile]) -> None:
        written: list[Path] = []
        try:
            while files:
                f = files.pop(0)  # each host copy is freed once written
                write_file(f.path, f.obj, f.save)
                written.append(Path(f.path))
        except BaseException as e:  # reported on the training thread by wait()
            self.error = f"{type(e).__name__}: {e}"
        if self._report is not None:
            try:
                self._report(written, self.error)
            except BaseException as e:
                self.error = self.error or f"reporting the written files failed: {type(e).__name__}: {e}"

    def wait(self) -> str | None:
        """Block until every file is written; the error that stopped the writing, if any."""
        self._thread.join()
        return self.error
