"""Training and evaluation batches from a shard dataset: the `data` config section and its loaders.

    build_train_loader(cfg, img_size=224, global_batch=4096, rank=r, world_size=W, seed=0)
        -> TrainLoader, iterated forever: (images (b, 3, H, W) float32, targets), b = global_batch / W;
           targets int64 (b,) for single-label data, float (b, K) multi-hot (or mixed, with mixup).
    build_eval_loader(cfg, split, img_size=224, batch_size=256, rank=r, world_size=W)
        -> finite batches of (images, targets, valid_mask); over all ranks every sample once.

The order of samples is `sharding.stream`'s: a function of (seed, epoch, step) alone, so
`state_dict()` is just the position of the next batch the trainer will receive, and it does not
change with the number of ranks or loader workers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import sharding
from pretrain.data import transforms as T
from sharding import format as fmt
from sharding.plan import EpochPlan, StreamLayout, default_width
from sharding.shard_source import ShardIndex, ShardSource
from sharding.stream import RankStream, check_error_rate, eval_batches, read_eval_batch
from sharding.tar_reader import ShardSample
from vitscale_common.errors import UserError

log = logging.getLogger(__name__)
_MIXUP_TAG = 0x313


@dataclasses.dataclass
class DataConfig:
    """Where the shards are, how they are streamed and how images are augmented."""

    path: str = ""  # shard dataset folder written by vit-prep (dataset.json, index/, shards/)
    train_split: str = "train"  # split streamed for training
    eval_split: str = "val"  # split used by periodic evaluation
    shards_url: Optional[str] = None  # fsspec URL holding the shard tars (s3://, gs://, https://); None: path/shards
    cache_dir: Optional[str] = None  # per-node folder caching remote shards; None: read remote shards directly
    cache_max_gb: float = 0.0  # size bound of cache_dir, least recently opened shards evicted first; 0: no bound
    workers: int = 2  # loader processes per rank (0: decode in the training process); must divide stream_cycle
    prefetch: int = 2  # batches each loader process prepares ahead
    shuffle_buffer: int = 1024  # samples held by each partition's shuffle buffer
    stream_width: int = 0  # partitions read per step; world sizes must divide it; 0: see sharding.plan.default_width
    stream_cycle: int = 8  # steps before a partition is read again; loader workers per rank must divide it
    crop_min_area: float = 0.05  # Inception crop: smallest fraction of the image area kept (official ViT: 5%)
    hflip: bool = True  # random horizontal flip in training
    randaugment_ops: int = 0  # RandAugment ops per image (AugReg: 2); 0: off
    randaugment_magnitude: int = 10  # RandAugment magnitude, 0..30 (AugReg: 10 or 15)
    mixup_alpha: float = 0.0  # Mixup Beta(alpha, alpha) (AugReg: 0.2 or 0.5); 0: off
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, on [0, 1] pixels
    std: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.5])  # mean = std = 0.5 maps to [-1, 1]
    eval_crop_fraction: float = 1.0  # evaluation centre crop: this fraction of the shorter side, resized to img_size
    max_error_rate: float = 0.01  # abort when more than this fraction of training samples had to be substituted
    verify_samples: bool = True  # check each sample's key and JPEG sha256 against the index (~1% of decode time)


# -- from a shard dataset to byte sources ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitSource:
    source: ShardSource
    counts: list[int]
    num_classes: int
    multi_label: bool
    excluded: frozenset[str]


def open_split(cfg: DataConfig, split: str) -> SplitSource:
    """The split's shards (local or remote), their sample counts and what is excluded."""
    if not cfg.path:
        raise UserError("data.path is not set: point it at a shard dataset written by vit-prep")
    ds = sharding.open_dataset(cfg.path)
    if split not in ds.splits:
        raise UserError(f"data: split {split!r} not in {cfg.path} (it has {', '.join(ds.splits)})")
    shards = ds.shards(split)
    base = cfg.shards_url.rstrip("/") if cfg.shards_url else None
    urls = [f"{base}/{fmt.shard_path(split, s.index)}" if base else s.path for s in shards]
    return SplitSource(
        source=ShardSource(
            urls,
            cfg.cache_dir,
            index=ShardIndex(cfg.path, split, [s.name for s in shards]),
            verify=cfg.verify_samples,
            cache_max_bytes=int(cfg.cache_max_gb * 1e9),
        ),
        counts=[int(s.num_samples) for s in shards],
        num_classes=int(ds.num_classes),
        multi_label=ds.label_kind == "multi",
        excluded=frozenset(ds.excluded_keys()),
    )


# -- one sample: bytes -> (image, label) -------------------------------------------------------
class SampleDecoder:
    """Decodes a shard sample into (HWC uint8 image, label); raises on anything unusable."""

    def __init__(self, cfg: DataConfig, img_size: int, train: bool, num_classes: int, multi_label: bool):
        self.cfg, self.img_size, self.train = cfg, img_size, train
        self.num_classes, self.multi_label = num_classes, multi_label
        use_randaug = train and cfg.randaugment_ops > 0
        self.randaug = T.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude) if use_randaug else None

    def label(self, sample: ShardSample) -> int | np.ndarray:
        if self.multi_label:
            labels = [int(i) for i in json.loads(sample.members["labels.json"])]
            if any(not 0 <= i < self.num_classes for i in labels):
                raise ValueError(f"label outside 0..{self.num_classes - 1}")
            hot = np.zeros(self.num_classes, dtype=np.float32)
            hot[labels] = 1.0
            return hot
        label = int(sample.members["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        return label

    def label_placeholder(self) -> int | np.ndarray:
        """The target of a padding slot (masked out, so its value never counts)."""
        return np.zeros(self.num_classes, dtype=np.float32) if self.multi_label else 0

    def __call__(self, sample: ShardSample, key: tuple[int, ...]):
        data = sample.members["jpg"]
        label = self.label(sample)
        if self.train:
            rng = np.random.default_rng(key)
            c = self.cfg
            image = T.train_image(
                data, self.img_size, rng, min_area=c.crop_min_area, hflip=c.hflip, randaug=self.randaug
            )
        else:
            image = T.eval_image(data, self.img_size, self.cfg.eval_crop_fraction)
        return image, label


def _targets(labels: list, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return torch.from_numpy(np.stack(labels))
    return torch.tensor(labels, dtype=torch.int64)


def _worker_share() -> tuple[int, int]:
    """(this worker's index, the number of workers) inside a loader process; (0, 1) outside one."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _worker_loader(dataset: IterableDataset, workers: int, prefetch: int) -> DataLoader:
    """Already-batched items from `workers` processes (0: in this one), pinned when a GPU takes them."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch if workers else None,
                      pin_memory=torch.cuda.is_available())  # fmt: skip


# -- training ----------------------------------------------------------------------------------
class _TrainBatches(IterableDataset):
    """One rank's batches from a resume point; inside a loader process, that worker's every K-th step."""

    def __init__(self, loader: "TrainLoader", epoch: int, step: int):
        self.loader, self.epoch, self.step = loader, epoch, step

    def __iter__(self) -> Iterator[dict]:
        L = self.loader
        worker, workers = _worker_share()
        decode = SampleDecoder(L.cfg, L.img_size, True, L.split.num_classes, L.split.multi_label)
        stream = RankStream(
            L.split.source, L.split.counts, L.layout, seed=L.seed, buffer=L.cfg.shuffle_buffer, decode=decode,
            rank=L.rank, world_size=L.world_size, excluded=L.split.excluded, worker=worker, workers=workers,
            epoch=self.epoch, step=self.step,
        )  # fmt: skip
        for batch in stream:
            images, labels = zip(*batch.items)
            x = T.batch_images(list(images), tuple(L.cfg.mean), tuple(L.cfg.std))
            y = _targets(list(labels), L.split.multi_label)
            if L.cfg.mixup_alpha > 0:
                if not L.split.multi_label:
                    y = torch.nn.functional.one_hot(y, L.split.num_classes).float()
                rng = np.random.default_rng([L.seed, batch.epoch, batch.step, L.rank, _MIXUP_TAG])
                x, y = T.mixup(x, y, L.cfg.mixup_alpha, rng)
            yield {"epoch": batch.epoch, "step": batch.step, "images": x, "targets": y, "counters": batch.counters}


class TrainLoader:
    """Endless training batches of one rank; the state is the position of the next batch handed out."""

    def __init__(self, cfg: DataConfig, split: SplitSource, layout: StreamLayout, *, img_size: int, rank: int,
                 world_size: int, seed: int):  # fmt: skip
        layout.check_readers(world_size, cfg.workers)
        self.cfg, self.split, self.layout = cfg, split, layout
        self.img_size, self.rank, self.world_size, self.seed = img_size, rank, world_size, seed
        plan = EpochPlan(split.counts, layout, seed, 0)
        self.steps_per_epoch = plan.steps
        self.remainder = plan.remainder  # samples per epoch left out (< one global batch)
        self.epoch, self.step = 0, 0  # the next batch handed to the trainer
        self._counters: collections.Counter = collections.Counter()
        self._samples = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset = _TrainBatches(self, self.epoch, self.step)
        for batch in _worker_loader(dataset, self.cfg.workers, self.cfg.prefetch):
            if (batch["epoch"], batch["step"]) != (self.epoch, self.step):
                got, want = f"{batch['epoch']}/{batch['step']}", f"{self.epoch}/{self.step}"
                raise RuntimeError(f"loader out of order: got epoch/step {got}, want {want}")
            self._counters.update(batch["counters"])
            self._samples += len(batch["images"])
            check_error_rate(self._counters, self._samples, self.cfg.max_error_rate)
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch["images"], batch["targets"]

    def counters(self) -> dict[str, int]:
        """Samples this rank had to substitute, by reason (and 'substituted' in total), since start."""
        return dict(self._counters)

    def state_dict(self) -> dict:
        """The stream position; only batches already handed out count as consumed."""
        L = self.layout
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "global_batch": L.global_batch,
                "stream_width": L.width, "stream_cycle": L.cycle, "shuffle_buffer": self.cfg.shuffle_buffer,
                "samples_per_epoch": sum(self.split.counts)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (saved at any world size); refuses a different sample order."""
        mine = self.state_dict()
        for key in ("seed", "global_batch", "stream_width", "stream_cycle", "shuffle_buffer", "samples_per_epoch"):
            if state.get(key) != mine[key]:
                raise UserError(
                    f"data stream state: {key} was {state.get(key)}, now {mine[key]}; "
                    f"the saved position does not apply to this sample order"
                )
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise UserError(f"data stream state: step {state['step']} outside an epoch of {self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def build_train_loader(cfg: DataConfig, *, img_size: int, global_batch: int, rank: int, world_size: int,
                       seed: int) -> TrainLoader:  # fmt: skip
    if global_batch % world_size:
        raise UserError(f"train.batch_size={global_batch} is not a multiple of the world size {world_size}")
    split = open_split(cfg, cfg.train_split)
    width = cfg.stream_width or default_width(global_batch, len(split.counts), cfg.stream_cycle)
    layout = StreamLayout(global_batch, width, cfg.stream_cycle)
    return TrainLoader(cfg, split, layout, img_size=img_size, rank=rank, world_size=world_size, seed=seed)


# -- evaluation --------------------------------------------------------------------------------
class _EvalBatches(IterableDataset):
    def __init__(self, loader: "EvalLoader"):
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        L = self.loader
        worker, workers = _worker_share()
        decode = SampleDecoder(L.cfg, L.img_size, False, L.split.num_classes, L.split.multi_label)
        counters: collections.Counter = collections.Counter()
        blank = (np.zeros((L.img_size, L.img_size, 3), np.uint8), decode.label_placeholder())
        for batch in L.batches[worker::workers]:
            items = read_eval_batch(L.split.source, L.split.counts, batch, decode, counters)
            valid = [item is not None for item in items] + [False] * (L.batch_size - len(items))
            items = [item if item is not None else blank for item in items] + [blank] * (L.batch_size - len(items))
            images, labels = zip(*items)
            x = T.batch_images(list(images), tuple(L.cfg.mean), tuple(L.cfg.std))
            yield x, _targets(list(labels), L.split.multi_label), torch.tensor(valid)
        if counters:
            log.warning("evaluation left out %d unusable samples (%s)", sum(counters.values()),
                        ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))  # fmt: skip


class EvalLoader:
    """Finite (images, targets, valid_mask) batches of one rank; padding and unreadable samples are masked."""

    def __init__(self, cfg: DataConfig, split: SplitSource, *, img_size: int, batch_size: int, rank: int,
                 world_size: int):  # fmt: skip
        self.cfg, self.split, self.img_size, self.batch_size = cfg, split, img_size, batch_size
        self.batches = eval_batches(sum(split.counts), batch_size, rank, world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(_worker_loader(_EvalBatches(self), min(self.cfg.workers, len(self.batches)), self.cfg.prefetch))


def build_eval_loader(cfg: DataConfig, split: str, *, img_size: int, batch_size: int, rank: int,
                      world_size: int) -> EvalLoader:  # fmt: skip
    return EvalLoader(cfg, open_split(cfg, split), img_size=img_size, batch_size=batch_size, rank=rank,
                      world_size=world_size)  # fmt: skip
