"""Loader batches on the host -> what the model takes, on its device: the one input path of every consumer.

Loaders hand over uint8 pixels, a quarter of the bytes of float32, or (with `data.decode: gpu`)
the JPEG bytes themselves with each sample's crop and flip. Everything after that happens on
the device, in `DeviceInput`: the copy (from pinned memory, non-blocking, the next batch while
the current step runs), the GPU decode, the cast, the normalisation and Mixup. The trainer,
periodic evaluation, `vit-eval`, the fine-tune and `vit-inspect` all go through it, so no
consumer normalises differently from another.

Mixup keeps the recipe's arithmetic (one Beta(alpha, alpha) weight per batch, each example
mixed with its neighbour) and its weight is drawn where it always was, from the stream's
random state for (seed, epoch, step, rank) in the loader: the batch carries the weight.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Iterator, Sequence

import torch

from pretrain.data.gpu_decode import JpegBatch, decode_crops


@dataclasses.dataclass
class HostBatch:
    """One rank's training batch as a loader hands it over."""

    images: torch.Tensor | JpegBatch  # uint8 (B, H, W, 3); or packed JPEGs with their crops (decode: gpu)
    targets: torch.Tensor  # int64 (B,) class indices, or float (B, K) multi-hot
    mix_weight: float | None = None  # Mixup's weight for this batch; None: no Mixup
    epoch: int = 0
    step: int = 0

    def pin_memory(self) -> "HostBatch":
        return dataclasses.replace(self, images=self.images.pin_memory(), targets=self.targets.pin_memory())

    def to(self, device: torch.device) -> "HostBatch":
        images = self.images.to(device, non_blocking=True)
        return dataclasses.replace(self, images=images, targets=self.targets.to(device, non_blocking=True))


class DeviceInput:
    """Casts, normalises ((x / 255 - mean) / std) and mixes batches on `device`; decodes JPEG batches there."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, num_classes: int = 0, img_size: int = 0):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_classes, self.img_size = num_classes, img_size
        # What the device decoder could not decode (data.decode: gpu), counted as the loaders count theirs.
        self.counters: collections.Counter = collections.Counter()
        self._affines: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def images(self, pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) on any device -> normalised float32 (B, 3, H, W) on `device`."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"DeviceInput takes uint8 pixels, got {pixels.dtype}")
        pixels = pixels.to(device, non_blocking=True)
        if pixels.shape[-1] == 3 and pixels.shape[1] != 3:
            pixels = pixels.permute(0, 3, 1, 2)  # a view: the copy below changes layout and type in one pass
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        out.copy_(pixels)
        scale, shift = self._affine(out.device)
        return out.mul_(scale).sub_(shift)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 / (255 std), mean / std) per channel on `device`, made once: no copy from the host per batch."""
        if device not in self._affines:
            m = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            self._affines[device] = ((1.0 / (255.0 * s)).to(device), (m / s).to(device))
        return self._affines[device]

    def __call__(self, batch: HostBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch -> (normalised images, targets) on `device`, Mixup applied."""
        pixels = batch.images
        if isinstance(pixels, JpegBatch):
            pixels = decode_crops(pixels, self.img_size, device, self.counters)
        x = self.images(pixels, device)
        y = batch.targets.to(device, non_blocking=True)
        if batch.mix_weight is not None:
            if y.dim() == 1:
                y = torch.nn.functional.one_hot(y, self.num_classes).float()
            x, y = mixup(x, y, batch.mix_weight)
        return x, y

    def ahead(self, batches: Iterable[HostBatch], device: torch.device | str) -> Iterator[tuple[torch.Tensor, ...]]:
        """`self(batch)` for each batch, the next batch's copy already issued while the caller uses this one.

        On a GPU the copies run on a side stream from pinned memory; each batch's copy is waited
        for by an event of its own, so waiting for this batch never waits for the next one.
        """
        device = torch.device(device)
        if device.type != "cuda":
            for batch in batches:
                yield self(batch, device)
            return
        copies = torch.cuda.Stream(device)

        def issue(batch: HostBatch):
            with torch.cuda.stream(copies):
                moved = batch.to(device)
                done = torch.cuda.Event()
                done.record(copies)
            return moved, done

        it = iter(batches)
        following = issue(batch) if (batch := next(it, None)) is not None else None
        while following is not None:
            moved, done = following
            following = issue(batch) if (batch := next(it, None)) is not None else None
            compute = torch.cuda.current_stream(device)
            compute.wait_event(done)
            _record_stream(moved, compute)  # the allocator must not reuse these buffers while compute reads them
            yield self(moved, device)


def mixup(images: torch.Tensor, targets: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with its neighbour (roll by one) with one weight per batch, as big_vision."""
    images = weight * images + (1 - weight) * images.roll(1, dims=0)
    targets = weight * targets + (1 - weight) * targets.roll(1, dims=0)
    return images, targets


def _record_stream(batch: HostBatch, stream) -> None:
    batch.targets.record_stream(stream)
    if isinstance(batch.images, torch.Tensor):  # a JpegBatch stays on the host: torchvision decodes from there
        batch.images.record_stream(stream)
