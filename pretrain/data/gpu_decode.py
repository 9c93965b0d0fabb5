"""Training JPEGs decoded in batches on the training device (`data.decode: gpu`).

A GPU node trains ViT-B/16 faster than its CPU cores can decode and crop JPEGs, so with
`data.decode: gpu` the work is split in two:

- the loader's readers (CPU, cheap) parse each JPEG's header, draw its crop box and flip with
  `transforms.draw_train_crop` from the sample's random state (the same draws, in the same
  order, as the CPU path's `transforms.train_image`), and pack the batch's JPEG bytes into one
  tensor with offsets (`plan_crop`, `JpegBatch.pack`);
- the training process decodes the batch with torchvision's `decode_jpeg` (nvJPEG on CUDA,
  libjpeg-turbo on the CPU), then crops, resizes and flips each sample on the device with
  the CPU path's own `transforms.crop_resize` (`decode_crops`).

A JPEG the device decoder rejects is decoded on the CPU with PIL and goes through the same
crop and resize, so both paths train on the same samples; such fallbacks are counted. With
`device=cpu` the pixels are the CPU path's, bit for bit; on a GPU they differ by what nvJPEG
and CUDA's floating-point resize round differently (docs/DATA_STREAM.md, "GPU decode").

RandAugment runs on PIL images and is not re-implemented here: `check_gpu_decode_config`
refuses it. Evaluation always decodes on the CPU (`transforms.eval_image`).

torchvision's decoders read the JPEG bytes from host memory (nvJPEG parses the stream on the
CPU and uploads what it needs itself), so a `JpegBatch` stays on the host; only the decoded
pixels live on the device.
"""

from __future__ import annotations

import dataclasses
from typing import MutableMapping, Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pretrain.data import transforms as T
from pretrain.data.decode_pool import nearest_good
from sharding.stream import StreamError
from vitscale_common.errors import UserError


def check_gpu_decode_config(randaugment_ops: int) -> None:
    """Refuse the settings the GPU decode path does not implement."""
    if randaugment_ops > 0:
        raise UserError(
            "data.decode=gpu does not support data.randaugment_ops > 0 (RandAugment runs on PIL images); "
            "use data.decode=cpu"
        )


# -- reader side: header, crop and flip, packing ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CropPlan:
    """A training sample's crop and flip, drawn by the reader before any pixel is decoded."""

    box: tuple[int, int, int, int]  # (left, top, width, height) in the JPEG's pixels
    flip: bool


def plan_crop(data: bytes, rng: np.random.Generator, *, min_area: float, hflip: bool) -> CropPlan:
    """The crop and flip `transforms.train_image` would draw for these bytes, from the header alone.

    Raises for bytes that are not a JPEG with a readable header, so the stream substitutes the
    sample in the reader, as it does for any sample it cannot use."""
    img = T.open_image(data)
    if img.format != "JPEG":
        raise ValueError(f"data.decode=gpu decodes JPEGs only, this sample is {img.format or 'unknown'}")
    box, flip = T.draw_train_crop(*img.size, rng, min_area=min_area, hflip=hflip)
    return CropPlan(box, flip)


def pack_jpegs(jpegs: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG byte strings -> (all bytes as one uint8 tensor, int64 offsets of length n + 1)."""
    sizes = np.fromiter((len(j) for j in jpegs), dtype=np.int64, count=len(jpegs))
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    flat = data.numpy()
    for j, start, end in zip(jpegs, offsets[:-1], offsets[1:]):
        flat[start:end] = np.frombuffer(j, dtype=np.uint8)
    return data, torch.from_numpy(offsets)


def unpack_jpegs(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The JPEGs of `pack_jpegs` as views into `data` (no copy)."""
    bounds = offsets.tolist()
    return [data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


@dataclasses.dataclass
class JpegBatch:
    """A batch's JPEG bytes, packed, with each sample's crop box and flip: what a reader hands over."""

    data: torch.Tensor  # uint8 (total bytes,)
    offsets: torch.Tensor  # int64 (n + 1,): sample i is data[offsets[i]:offsets[i + 1]]
    boxes: torch.Tensor  # int32 (n, 4): left, top, width, height
    flips: torch.Tensor  # bool (n,)

    @classmethod
    def pack(cls, jpegs: Sequence[bytes], crops: Sequence[CropPlan]) -> "JpegBatch":
        if len(jpegs) != len(crops):
            raise ValueError(f"{len(jpegs)} JPEGs but {len(crops)} crop plans")
        data, offsets = pack_jpegs(jpegs)
        boxes = torch.tensor([c.box for c in crops], dtype=torch.int32).reshape(len(crops), 4)
        flips = torch.tensor([c.flip for c in crops], dtype=torch.bool)
        return cls(data, offsets, boxes, flips)

    def __len__(self) -> int:
        return len(self.flips)

    def jpegs(self) -> list[torch.Tensor]:
        return unpack_jpegs(self.data, self.offsets)

    def pin_memory(self) -> "JpegBatch":
        """Itself: the decoders read the bytes on the host, so there is no copy to speed up."""
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JpegBatch":
        """Itself, on the host: `decode_crops(batch, size, device)` puts the decoded pixels on `device`."""
        return self


# -- training-process side: decode, crop, resize, flip ------------------------------------------
def decode_crops(
    batch: JpegBatch, size: int, device: torch.device | str, counters: MutableMapping[str, int] | None = None
) -> torch.Tensor:
    """A `JpegBatch` -> uint8 (n, 3, size, size) on `device`: each sample decoded, cropped, resized, flipped.

    JPEGs the device decoder rejects are decoded with PIL on the CPU (counted as
    `decode_cpu_fallback`). A sample neither can decode is replaced by the nearest earlier
    sample of the batch that decodes (else the nearest later one), counted as `decode_error`
    and `substituted`, as the CPU path's decoders do; a batch with no decodable sample raises.
    """
    device = torch.device(device)
    counts = counters if counters is not None else {}
    images = _decode_all(batch.jpegs(), device, counts)
    out = torch.empty((len(batch), 3, size, size), dtype=torch.uint8, device=device)
    # Host lists, read once: indexing device tensors per sample would sync the GPU each time.
    plans = zip(images, batch.boxes.tolist(), batch.flips.tolist())
    for i, (image, box, flip) in enumerate(plans):
        if image is not None:
            out[i] = T.crop_resize(image, box, size, flip)
    good = [i for i, image in enumerate(images) if image is not None]
    for i in (i for i, image in enumerate(images) if image is None):
        if not good:
            raise StreamError(f"no JPEG of a batch of {len(batch)} decodes")
        j = nearest_good(i, good)
        out[i] = out[j]
        counts["decode_error"] = counts.get("decode_error", 0) + 1
        counts["substituted"] = counts.get("substituted", 0) + 1
    return out


def _decode_all(
    jpegs: list[torch.Tensor], device: torch.device, counts: MutableMapping[str, int]
) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 images on `device`, None where no decoder reads the JPEG."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except Exception:  # the batch call fails as a whole: find the JPEGs it rejects one by one
        pass
    images: list[torch.Tensor | None] = []
    for jpeg in jpegs:
        try:
            images.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
        except Exception:  # whatever the decoder raises, PIL gets its chance
            images.append(_decode_with_pil(jpeg, device))
            if images[-1] is not None:
                counts["decode_cpu_fallback"] = counts.get("decode_cpu_fallback", 0) + 1
    return images


def _decode_with_pil(jpeg: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return T.pil_rgb(jpeg.numpy().tobytes()).to(device)
    except Exception:  # any decoder failure is a bad sample, by contract
        return None
