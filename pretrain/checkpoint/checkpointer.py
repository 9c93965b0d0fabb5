"""Checkpoints in the run directory: complete or ignored, never half-trusted.

Layout: `checkpoints/step-NNNNNNNN/` holds DeepSpeed's files (its own `latest` file is
never written: we load by explicit tag), each rank's RNG state, our trainer state (step,
samples seen, world size, data stream position, config fingerprint, EMA) and, written
last by rank 0 after every rank has finished, `manifest.json` listing every file with its
size. A folder without a manifest that matches the files on disk is incomplete (a kill
mid-save) and is never resumed from. `checkpoints/latest` names the newest complete one and
is replaced by atomic rename. How the files are written (by their own rank, fsync'd, maybe
in the background) is `checkpoint_writes`'s job.

Resuming on another world size goes through DeepSpeed's universal checkpoint where the
optimizer state is partitioned (ZeRO stages 1-3): the folder is converted once
(`universal/` inside it, guarded by its own marker) and loaded with `load_universal`.
Stage 0 keeps the whole optimizer in one file, which loads as it is. Weights then differ
from a same-size run in the last bits (the gradient averaging changes), but the data
position, step, schedule and optimizer moments carry over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint.reports import SaveReports
from pretrain.checkpoint.writes import BackgroundWrite, PendingFile, host_copy, route_writes, write_file
from pretrain.runtime.collectives import all_reduce_flags, barrier, broadcast_object
from vitscale_common.atomic import atomic_write_text, remove_stale_temps
from vitscale_common.errors import UserError

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"
UNIVERSAL_DIR = "universal"
_TAG_RE = re.compile(r"^step-(\d{8})$")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 1000  # save every N optimizer steps (0: only at the end and on a signal)
    keep: int = 3  # complete checkpoints kept; older ones are deleted after a new one completes
    resume: bool = True  # resume from the newest complete checkpoint in the run directory
    # Write in a background thread: a step boundary then waits only for a host copy of the
    # state (one save in flight; the save before a stop or at the end is always waited for).
    async_save: bool = False


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    return int(_TAG_RE.match(tag).group(1))


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state as plain values, so torch.load(weights_only=True) can read it back.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- manifest
def write_manifest(folder: Path, step: int, files: dict[str, int]) -> None:
    """The commit: `files` (every rank's reported files and sizes) make `folder` resumable."""
    body = {"step": step, "files": files, "bytes": sum(files.values())}
    atomic_write_text(folder / MANIFEST, json.dumps(body, indent=1, sort_keys=True))


def problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when its manifest matches the disk."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (interrupted while saving)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    for name, size in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            return f"missing {name}"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, manifest says {size}"
    return None


@dataclasses.dataclass
class Scan:
    complete: list[Path]  # oldest first
    incomplete: dict[Path, str]  # folder -> why

    @property
    def newest(self) -> Path | None:
        return self.complete[-1] if self.complete else None


def scan(root: Path) -> Scan:
    complete, incomplete = [], {}
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)):
            why = problem(folder)
            if why is None:
                complete.append(folder)
            else:
                incomplete[folder] = why
    return Scan(complete, incomplete)


# --------------------------------------------------------------------------- save / load
class Checkpointer:
    """Saves and restores one run's checkpoints; every method is called on every rank."""

    def __init__(self, root: Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.root, self.cfg, self.rank, self.world_size = Path(root), cfg, rank, world_size
        self.pending: BackgroundWrite | None = None  # a save still being written
        self.reports = SaveReports(rank, world_size)
        self._committer: threading.Thread | None = None  # rank 0: commits the background save
        self._commit_error: str | None = None

    def clean_incomplete(self) -> dict[Path, str]:
        """Delete interrupted saves (reported), so a re-save of the same step starts clean."""
        found = scan(self.root)
        if self.rank == 0:
            for folder, why in found.incomplete.items():
                print(f"checkpoint: ignoring and removing {folder.name}: {why}", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
            if self.root.is_dir():  # a starting run is the only writer of its checkpoints
                remove_stale_temps(self.root, all_writers=True)
        barrier()
        return found.incomplete

    def save(self, engine, step: int, state: dict[str, Any], *, final: bool = True) -> Path:
        """Collective: DeepSpeed's shards, RNG per rank, our state, then the manifest.

        With `checkpoint.async_save` and not `final`, this returns once the state is copied
        to host memory; a thread on each rank writes its files and reports them, and a thread
        on rank 0 commits the checkpoint (manifest, `latest`) as soon as every rank has. A
        `final` save (before a stop, at the end) is committed when this returns.
        """
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

        self.finish()  # one save in flight at most
        tag = tag_for(step)
        folder = self.root / tag
        if self.rank == 0 and folder.exists():  # left by a run that died while saving this step
            shutil.rmtree(folder)
        barrier()
        background = self.cfg.async_save and not final
        captured: list[PendingFile] = []
        writes = route_writes(engine)
        writes.written = []
        # ZeRO-1/2 checkpoints need this marker for the universal (other world size) conversion.
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2}}
        try:
            with writes.capturing(captured) if background else contextlib.nullcontext():
                engine.save_checkpoint(str(self.root), tag=tag, client_state=info, save_latest=False)
            ours = [PendingFile(folder / f"rng-rank{self.rank:05d}.pt", rng_state())]
            if self.rank == 0:
                ours.append(PendingFile(folder / STATE_FILE, {**state, "world_size": self.world_size}))
            if background:
                captured += [dataclasses.replace(f, obj=host_copy(f.obj)) for f in ours]
                self.pending = BackgroundWrite(folder, step, captured, report=partial(self.reports.publish, folder))
                if self.rank == 0:
                    self._committer = threading.Thread(
                        target=self._commit_in_background, args=(folder, step), name=f"commit-{tag}", daemon=True
                    )
                    self._committer.start()
                return folder
            for f in ours:
                write_file(f.path, f.obj)
        except BaseException as e:  # rank 0 must not wait for this rank's report
            self.reports.publish(folder, [], f"{type(e).__name__}: {e}")
            raise
        self.reports.publish(folder, writes.written + [f.path for f in ours], None)
        if self.rank == 0:
            self._commit(folder, step)
        barrier()  # the commit is done when every rank returns
        return folder

    def finish(self) -> Path | None:
        """Collective: wait for the save in flight and vouch for it; its folder, or None."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        error = pending.wait()
        if self._committer is not None:
            self._committer.join()
            self._committer = None
        error, self._commit_error = error or self._commit_error, None
        if all_reduce_flags(error is not None)[0]:
            where = f"on rank {self.rank}: {error}" if error else "on another rank"
            raise UserError(f"{pending.folder}: writing the checkpoint failed {where}")
        return pending.folder

    def _commit(self, folder: Path, step: int) -> bool:
        """Rank 0, once every rank has reported: the manifest, then `latest`, then pruning."""
        files = self.reports.collect(folder)
        if files is None:  # a rank failed to write; it reports why
            return False
        write_manifest(folder, step, files)
        atomic_write_text(self.root / "latest", folder.name + "\n")
        self._prune()
        return True

    def _commit_in_background(self, folder: Path, step: int) -> None:
        try:
            self._commit(folder, step)
        except BaseException as e:  # reported by finish() on the training thread
            self._commit_error = f"committing failed: {type(e).__name__}: {e}"

    def _prune(self) -> None:
        complete = scan(self.root).complete
        for old in complete[: max(len(complete) - self.cfg.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_state(folder: Path) -> dict[str, Any]:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)

    @staticmethod
    def partitioned(folder: Path) -> bool:
        """Whether the optimizer state is cut into per-rank files (`*_optim_states.pt`)."""
        return any(Path(folder).glob("*_optim_states.pt"))

    def prepare_universal(self, folder: Path) -> Path:
        """Convert `folder` to DeepSpeed's world-size independent layout (rank 0, once)."""
        out = folder / UNIVERSAL_DIR
        done = out / ".complete"
        if self.rank == 0 and not done.exists():
            from deepspeed.checkpoint import ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            args = ds_to_universal_args(folder, out)
            ds_to_universal.main(args)
            atomic_write_text(done, "ok\n")
        barrier()
        return out

    def agree_on_resume(self, enabled: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
        """Collective: the checkpoint to resume from and its trainer state, the same on every rank.

        Rank 0 scans and reads the state once and sends both: ranks scanning for themselves
        could disagree on a network file system, and would each read the same file. The EMA
        weights (as large as the model) are not sent; `load` reads them where they are used.
        """
        choice: tuple[str | None, dict[str, Any] | None] = (None, None)
        if self.rank == 0 and enabled:
            newest = scan(self.root).newest
            if newest is not None:
                state = self.read_state(newest)
                state.pop("ema", None)
                choice = (str(newest), state)
        folder, state = broadcast_object(choice)
        return (Path(folder) if folder else None), state

    def load(
        self, engine, folder: Path, *, universal: bool, same_world: bool, with_ema: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """Restore engine (weights, optimizer, schedule) and, at the same world size, RNG; the
        checkpoint's EMA weights when `with_ema` (None where it has none)."""
        load_dir, tag = (folder, UNIVERSAL_DIR) if universal else (self.root, folder.name)
        path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(f"{folder}: DeepSpeed could not load this checkpoint")
        rng_file = folder / f"rng-rank{self.rank:05d}.pt"
        if same_world and rng_file.exists():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        return self.read_state(folder).get("ema") if with_ema else None


def ds_to_universal_args(src: Path, out: Path):
    import argparse

    return argparse.Namespace(
        input_folder=str(src),
        output_folder=str(out),
        # Parameters are extracted and merged independently: one process per core, up to 8.
        num_extract_workers=min(os.cpu_count() or 1, 8),
        num_merge_workers=min(os.cpu_count() or 1, 8),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any], allowed: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, minus allowed prefixes."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(saved), flat(current)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not any(k == p or k.startswith(p + ".") for p in allowed)]


def file_digest(path: Path) -> str:
    """A short content hash of a small file (the dataset's dataset.json)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).is_file() else "absent"
