"""Readers apart from decoders: a rank's training batches made by two kinds of process.

The stream's partitions must each be read by one reader, front to back, so the number of
readers is fixed by the plan (a divisor of `data.stream_cycle`: reader r takes every R-th
step). Reading is cheap (tar members, checksums, JPEG headers); decoding and augmenting are
not, and they have no such constraint. So readers cut each step's samples into pieces of at
most `PIECE` and put them on one task queue; any number of decoder processes take pieces as
they come, and a collector thread in the training process puts each step back together in
step order. Which decoder made a piece changes nothing in it,
so the batches are the same for any pool size, and a run resumes with another.
A finite read ends the iteration once every reader has handed over its last step.

Back-pressure: reader r may run at most `ahead` of its steps past the last one handed out, so
memory stays bounded however slow the consumer is. Any exception in a reader or decoder,
and any process that dies, ends the iteration in the training process with its message.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import threading
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors)

PIECE = 16  # samples per decode task: small enough to spread a rank's batch over many decoders


@dataclasses.dataclass
class StepWork:
    """What a reader makes of one step: the pieces to decode and what comes along undecoded."""

    pieces: list[Any]
    meta: Any


Read = Callable[[int, int], Iterator[StepWork]]  # (reader, readers) -> that reader's steps, in order
Decode = Callable[[Any], Any]  # a piece -> its decoded result
Assemble = Callable[[Any, list[Any]], Any]  # (meta, decoded pieces in order) -> the step's batch


def split_into_pieces(items: list) -> list[list]:
    """Consecutive runs of at most PIECE items: a function of the batch alone, not of the pool."""
    return [items[i : i + PIECE] for i in range(0, len(items), PIECE)]


def nearest_good(i: int, good: list[int]) -> int:
    """The sample that stands in for undecodable sample i of a batch or piece: the nearest
    earlier one in `good` (ascending), else the nearest later one."""
    return max((g for g in good if g < i), default=min(good))


def _reader_main(read: Read, reader: int, readers: int, permits, tasks, results, stop) -> None:
    torch.set_num_threads(1)
    try:
        steps = 0
        for n, work in enumerate(read(reader, readers)):
            while not permits.acquire(timeout=0.5):
                if stop.is_set():
                    return
            seq = n * readers + reader
            results.put(("meta", seq, len(work.pieces), work.meta))
            for i, piece in enumerate(work.pieces):
                tasks.put((seq, i, piece))
            steps = n + 1
        results.put(("end", reader, steps))
    except Exception:
        results.put(("error", f"loader reader {reader}", traceback.format_exc()))


def _decoder_main(decode: Decode, index: int, tasks, results) -> None:
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        seq, i, piece = task
        try:
            results.put(("piece", seq, i, decode(piece)))
        except Exception:
            results.put(("error", f"loader decoder {index}", traceback.format_exc()))
            return


class ReaderDecoderPool:
    """Iterates the assembled batches of `readers` reader and `decoders` decoder processes, in step order."""

    def __init__(self, read: Read, decode: Decode, assemble: Assemble, *, readers: int, decoders: int, ahead: int):
        if readers < 1 or decoders < 0:
            raise ValueError(
                f"a reader-decoder pool needs a reader or more, got {readers} readers, {decoders} decoders"
            )
        self.read, self.decode, self.assemble = read, decode, assemble
        self.readers, self.decoders, self.ahead = readers, decoders, ahead

    def __iter__(self) -> Iterator[Any]:
        ctx = mp.get_context("fork")  # as DataLoader: the read/decode functions need not be picklable
        tasks, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        permits = [ctx.Semaphore(self.ahead) for _ in range(self.readers)]
        procs = [
            ctx.Process(target=_reader_main, args=(self.read, r, self.readers, permits[r], tasks, results, stop),
                        name=f"loader reader {r}", daemon=True)
            for r in range(self.readers)
        ] + [
            ctx.Process(target=_decoder_main, args=(self.decode, d, tasks, results), name=f"loader decoder {d}",
                        daemon=True)
            for d in range(self.decoders)
        ]  # fmt: skip
        for p in procs:
            p.start()
        ready: queue.Queue = queue.Queue(maxsize=2)
        collector = threading.Thread(target=self._collect, args=(results, ready, procs, stop), daemon=True)
        collector.start()
        seq = 0
        try:
            while True:
                kind, payload = ready.get()
                if kind == "error":
                    raise RuntimeError(payload)
                if kind == "end":
                    return
                yield payload
                permits[seq % self.readers].release()
                seq += 1
        finally:
            stop.set()
            for _ in range(self.decoders):
                tasks.put(None)
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():
                    p.terminate()
            collector.join(timeout=5)

    def _collect(self, results, ready: queue.Queue, procs: list, stop) -> None:
        """Reassembles steps in order: a thread of the training process, so `assemble` (copies, pinning) runs off its path."""
        pending: dict[int, dict] = {}
        seq = 0
        ended: dict[int, int] = {}  # reader -> its number of steps, once it has read them all
        while not stop.is_set():
            if len(ended) == self.readers and seq == sum(ended.values()):
                self._hand(ready, stop, "end", None)
                return
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    self._hand(ready, stop, "error", f"{dead[0].name} died with exit code {dead[0].exitcode}")
                    return
                continue
            if msg[0] == "error":
                self._hand(ready, stop, "error", f"{msg[1]} failed:\n{msg[2]}")
                return
            if msg[0] == "end":
                ended[msg[1]] = msg[2]
                continue
            step = pending.setdefault(msg[1], {"pieces": {}})
            if msg[0] == "meta":
                step["count"], step["meta"] = msg[2], msg[3]
            else:
                step["pieces"][msg[2]] = msg[3]
            while seq in pending and len(pending[seq]["pieces"]) == pending[seq].get("count", -1):
                done = pending.pop(seq)
                batch = self.assemble(done["meta"], [done["pieces"][i] for i in range(done["count"])])
                if not self._hand(ready, stop, "batch", batch):
                    return
                seq += 1

    @staticmethod
    def _hand(ready: queue.Queue, stop, kind: str, payload) -> bool:
        while not stop.is_set():
            try:
                ready.put((kind, payload), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False
