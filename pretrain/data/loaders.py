"""Training and evaluation batches from a shard dataset: the `data` config section and its loaders.

    build_train_loader(cfg, img_size=224, global_batch=4096, rank=r, world_size=W, seed=0)
        -> TrainLoader, iterated forever: HostBatch(images uint8 (b, H, W, 3), or packed JPEGs
           with their crops for GPU decode; targets; Mixup weight), b = global_batch / W;
           targets int64 (b,) for single-label data, float (b, K) multi-hot.
    build_eval_loader(cfg, split, img_size=224, batch_size=256, rank=r, world_size=W)
        -> finite batches of (uint8 images (b, H, W, 3), targets, valid_mask); over all ranks
           every sample once.
    loader.device_input(batch, device) -> (normalised float images, targets) on the device (Mixup
        applied): the only way from a batch to the model (pretrain.data.device_input).

The order of samples is `sharding.stream`'s: a function of (seed, epoch, step) alone, so
`state_dict()` is just the position of the next batch the trainer will receive, and it does not
change with the number of ranks, readers or decoders.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import sharding
from pretrain.data import transforms as T
from pretrain.data.decode_pool import ReaderDecoderPool, StepWork, nearest_good, split_into_pieces
from pretrain.data.device_input import DeviceInput, HostBatch
from pretrain.data.gpu_decode import CropPlan, JpegBatch, check_gpu_decode_config, plan_crop
from sharding import format as fmt
from sharding.plan import EpochPlan, StreamLayout, default_width
from sharding.shard_source import ShardIndex, ShardSource
from sharding.stream import RankStream, StreamError, check_error_rate, eval_batches, read_eval_batch
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
    workers: int = 2  # decoding processes per rank, any number (0: read and decode in the training process)
    readers: int = 2  # partition-reading processes per rank (with workers > 0); must divide stream_cycle
    decode: str = "cpu"  # training JPEGs decoded by the workers (cpu), or in batches on the GPU (gpu)
    prefetch: int = 2  # steps each reader prepares ahead
    shuffle_buffer: int = 1024  # samples held by each partition's shuffle buffer
    stream_width: int = 0  # partitions read per step; world sizes must divide it; 0: see sharding.plan.default_width
    stream_cycle: int = 8  # steps before a partition is read again; readers per rank must divide it
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
@dataclasses.dataclass(frozen=True)
class Prepared:
    """A training sample as a reader hands it on to the decoders: nothing decoded yet but the header."""

    name: str  # the sample's key, for log lines
    jpeg: bytes
    label: int | np.ndarray
    key: tuple[int, ...]  # seeds the sample's augmentation
    crop: CropPlan | None = None  # drawn by the reader when the GPU decodes (data.decode: gpu)


class SampleDecoder:
    """Shard samples -> labels and HWC uint8 images; raises on anything unusable.

    Training splits the work: `prepare` runs in a partition reader (label, JPEG header, and
    for GPU decode the crop), `pixels` in a decoder. What `prepare` rejects the stream
    substitutes within the partition, as it does for unreadable samples.
    """

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

    def prepare(self, sample: ShardSample, key: tuple[int, ...]) -> Prepared:
        data = sample.members["jpg"]
        label = self.label(sample)
        if self.train and self.cfg.decode == "gpu":
            crop = plan_crop(data, np.random.default_rng(key), min_area=self.cfg.crop_min_area, hflip=self.cfg.hflip)
            return Prepared(sample.key, data, label, key, crop)
        T.open_image(data)  # the header: bytes that are no image are caught here, in the reader
        return Prepared(sample.key, data, label, key)

    def pixels(self, sample: Prepared) -> np.ndarray:
        if self.train:
            c = self.cfg
            rng = np.random.default_rng(sample.key)
            return T.train_image(
                sample.jpeg, self.img_size, rng, min_area=c.crop_min_area, hflip=c.hflip, randaug=self.randaug
            )
        return T.eval_image(sample.jpeg, self.img_size, self.cfg.eval_crop_fraction)

    def __call__(self, sample: ShardSample, key: tuple[int, ...]):
        """(image, label) of one sample, in one go (evaluation)."""
        prepared = self.prepare(sample, key)
        return self.pixels(prepared), prepared.label

    def decode_piece(self, piece: list[Prepared]) -> tuple[np.ndarray, dict[str, int]]:
        """A run of prepared samples -> uint8 (n, S, S, 3), and what had to be replaced.

        A sample whose header read but whose data does not decode is replaced by the nearest
        earlier sample of the piece that decodes (else the nearest later one), augmented with its
        own key: pieces are cut from the batch alone, so the result does not depend on the pool.
        """
        # A plain array: pickled through the pool's pipe it costs less than a shared-memory
        # tensor per piece (a new segment, its descriptor passed over a socket).
        pixels = np.empty((len(piece), self.img_size, self.img_size, 3), dtype=np.uint8)
        failed: dict[int, Exception] = {}
        for i, sample in enumerate(piece):
            try:
                pixels[i] = self.pixels(sample)
            except Exception as e:  # any decoder failure is a bad sample, by contract
                failed[i] = e
        counters: collections.Counter = collections.Counter()
        good = [i for i in range(len(piece)) if i not in failed]
        for i, e in failed.items():
            if not good:
                raise StreamError(f"sample {piece[i].name}: {e}; no other sample of its batch piece decodes either")
            j = nearest_good(i, good)
            pixels[i] = self.pixels(dataclasses.replace(piece[j], key=piece[i].key))
            counters["decode_error"] += 1
            counters["substituted"] += 1
            log.warning("sample %s: decode_error (%s); substituted by %s", piece[i].name, e, piece[j].name)
        return pixels, dict(counters)


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


def _device_input(cfg: DataConfig, split: SplitSource, img_size: int) -> DeviceInput:
    return DeviceInput(cfg.mean, cfg.std, num_classes=split.num_classes, img_size=img_size)


# -- training ----------------------------------------------------------------------------------
class TrainLoader:
    """Endless training batches (`HostBatch`) of one rank; the state is the position of the next batch handed out.

    `data.readers` processes read the partitions (a divisor of `stream_cycle`), `data.workers`
    processes decode (any number; 0: reading and decoding in this process). `device_input`
    turns the batches into the model's input on its device.
    """

    def __init__(self, cfg: DataConfig, split: SplitSource, layout: StreamLayout, *, img_size: int, rank: int,
                 world_size: int, seed: int):  # fmt: skip
        layout.check_readers(world_size, cfg.readers)
        self.cfg, self.split, self.layout = cfg, split, layout
        self.img_size, self.rank, self.world_size, self.seed = img_size, rank, world_size, seed
        self.device_input = _device_input(cfg, split, img_size)
        plan = EpochPlan(split.counts, layout, seed, 0)
        self.steps_per_epoch = plan.steps
        self.remainder = plan.remainder  # samples per epoch left out (< one global batch)
        self.epoch, self.step = 0, 0  # the next batch handed to the trainer
        self._counters: collections.Counter = collections.Counter()
        self._samples = 0

    def _decoder(self) -> SampleDecoder:
        return SampleDecoder(self.cfg, self.img_size, True, self.split.num_classes, self.split.multi_label)

    def _read(self, epoch: int, step: int, reader: int, readers: int) -> Iterator[StepWork]:
        """One reader's steps: the samples to decode (or, for GPU decode, the packed JPEGs) and the targets."""
        decoder = self._decoder()
        stream = RankStream(
            self.split.source, self.split.counts, self.layout, seed=self.seed, buffer=self.cfg.shuffle_buffer,
            decode=decoder.prepare, rank=self.rank, world_size=self.world_size, excluded=self.split.excluded,
            reader=reader, readers=readers, epoch=epoch, step=step,
        )  # fmt: skip
        for batch in stream:
            targets = _targets([p.label for p in batch.items], self.split.multi_label)
            mix_weight = None
            if self.cfg.mixup_alpha > 0:
                rng = np.random.default_rng([self.seed, batch.epoch, batch.step, self.rank, _MIXUP_TAG])
                mix_weight = float(rng.beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
            head = HostBatch(None, targets, mix_weight, batch.epoch, batch.step)
            if self.cfg.decode == "gpu":
                jpegs = JpegBatch.pack([p.jpeg for p in batch.items], [p.crop for p in batch.items])
                yield StepWork([], (dataclasses.replace(head, images=jpegs), batch.counters))
            else:
                yield StepWork(split_into_pieces(batch.items), (head, batch.counters))

    def _assemble(self, meta, pieces: list) -> tuple[HostBatch, dict]:
        head, counters = meta
        if pieces:
            images = torch.from_numpy(np.concatenate([p[0] for p in pieces]))
            counters = sum((collections.Counter(p[1]) for p in pieces), collections.Counter(counters))
            head = dataclasses.replace(head, images=images)
        return (head.pin_memory() if torch.cuda.is_available() else head), dict(counters)

    def _batches(self) -> Iterator[tuple[HostBatch, dict]]:
        read = functools.partial(self._read, self.epoch, self.step)
        if self.cfg.workers == 0:
            decoder = self._decoder()
            for work in read(0, 1):
                yield self._assemble(work.meta, [decoder.decode_piece(p) for p in work.pieces])
            return
        decoders = 0 if self.cfg.decode == "gpu" else self.cfg.workers
        yield from ReaderDecoderPool(read, self._decoder().decode_piece, self._assemble, readers=self.cfg.readers,
                                     decoders=decoders, ahead=self.cfg.prefetch)  # fmt: skip

    def __iter__(self) -> Iterator[HostBatch]:
        for batch, counters in self._batches():
            if (batch.epoch, batch.step) != (self.epoch, self.step):
                got, want = f"{batch.epoch}/{batch.step}", f"{self.epoch}/{self.step}"
                raise RuntimeError(f"loader out of order: got epoch/step {got}, want {want}")
            self._counters.update(counters)
            self._samples += len(batch.targets)
            check_error_rate(self.counters(), self._samples, self.cfg.max_error_rate)
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch

    def counters(self) -> dict[str, int]:
        """Samples this rank had to substitute, by reason (and 'substituted' in total), since start.

        With `data.decode: gpu` this includes what the device decoder counted on the batches
        handed out so far (`device_input.counters`).
        """
        return dict(self._counters + self.device_input.counters)

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
    if cfg.decode not in ("cpu", "gpu"):
        raise UserError(f"data.decode={cfg.decode!r}: choose cpu (the loader's workers) or gpu (the training device)")
    if cfg.decode == "gpu":
        check_gpu_decode_config(cfg.randaugment_ops)
    if cfg.workers > 0 and cfg.readers < 1:
        raise UserError(f"data.readers={cfg.readers}: with loader workers at least one reader process is needed")
    split = open_split(cfg, cfg.train_split)
    width = cfg.stream_width or default_width(global_batch, len(split.counts), cfg.stream_cycle)
    layout = StreamLayout(global_batch, width, cfg.stream_cycle)
    return TrainLoader(cfg, split, layout, img_size=img_size, rank=rank, world_size=world_size, seed=seed)


# -- evaluation --------------------------------------------------------------------------------
class _EvalBatches(IterableDataset):
    def __init__(self, loader: "EvalLoader"):
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(uint8 (B, S, S, 3) images, targets, valid mask) per batch of this worker's share."""
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
            yield torch.from_numpy(np.stack(images)), _targets(list(labels), L.split.multi_label), torch.tensor(valid)
        if counters:
            log.warning("evaluation left out %d unusable samples (%s)", sum(counters.values()),
                        ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))  # fmt: skip


class EvalLoader:
    """Finite (uint8 images, targets, valid_mask) batches of one rank; padding and unreadable samples are masked.

    Evaluation batches have no partitions to keep apart, so `data.workers` processes each read
    and decode whole batches; `device_input` turns their images into the model's input.
    """

    def __init__(self, cfg: DataConfig, split: SplitSource, *, img_size: int, batch_size: int, rank: int,
                 world_size: int):  # fmt: skip
        self.cfg, self.split, self.img_size, self.batch_size = cfg, split, img_size, batch_size
        self.device_input = _device_input(cfg, split, img_size)
        self.batches = eval_batches(sum(split.counts), batch_size, rank, world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(_worker_loader(_EvalBatches(self), min(self.cfg.workers, len(self.batches)), self.cfg.prefetch))


def build_eval_loader(cfg: DataConfig, split: str, *, img_size: int, batch_size: int, rank: int,
                      world_size: int) -> EvalLoader:  # fmt: skip
    return EvalLoader(cfg, open_split(cfg, split), img_size=img_size, batch_size=batch_size, rank=rank,
                      world_size=world_size)  # fmt: skip
