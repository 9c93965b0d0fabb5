"""Image transforms of the paper's recipes, on PIL images, driven by an explicit random generator.

Training: Inception crop (random area in [min_area, 1] of the image, aspect ratio in [3/4, 4/3],
as the official ViT code with min area 5%, not torchvision's 8%), resize to the model size,
horizontal flip, optionally RandAugment (AugReg). Evaluation: resize the shorter side, centre
crop. The results are uint8; casting, normalisation and Mixup happen on the device
(`pretrain.data.device_input`).

Every random choice comes from the `numpy.random.Generator` passed in, which the stream seeds
per sample slot; so an augmented sample is the same however the run was cut into pieces.

Training crops are decoded by libjpeg-turbo through torchvision (`decode_rgb`) and resized by
torch's antialiased bilinear filter (`crop_resize`), the code the GPU decode path runs on its
device: on a CPU the pair costs about two thirds of PIL's decode + resize (docs/DATA_STREAM.md,
"Throughput"), and both paths make the same pixels from the same crop. Evaluation images are
decoded by PIL at reduced size (`draft`, DCT scaling) whenever the crop still covers the output
at full resolution.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

MAX_PIXELS = 89_478_485  # PIL's own bomb threshold, checked from the header before decoding


def open_image(data: bytes) -> Image.Image:
    """A lazily-decoded image; too many pixels is an error before any decoding happens."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image of {w}x{h} pixels is over the {MAX_PIXELS} pixel limit")
    return img


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W), by libjpeg-turbo; what it refuses (not a JPEG, odd
    colour spaces) by PIL. Raises what PIL raises when neither reads it."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # libjpeg's strict reader refused it; PIL reads more
        return pil_rgb(data)


def pil_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W) by PIL, the pixel limit checked first."""
    return torch.from_numpy(np.array(open_image(data).convert("RGB"))).permute(2, 0, 1)


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): `box` (left, top, width, height), resized with
    antialiased bilinear (the triangle filter of PIL's BILINEAR), then flipped if `flip`."""
    left, top, width, height = box
    crop = image[None, :, top : top + height, left : left + width]
    if crop.device.type == "cpu":
        # Channels-last uint8 takes torch's vectorised fixed-point kernel, ~6x PIL's resize.
        crop = crop.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    else:  # CUDA's antialiased kernels take floating point only
        out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = out[0].round_().to(torch.uint8)
    return out.flip(-1) if flip else out


def _decode_region(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Crop `box` (in original pixels) resized to size x size, decoding a JPEG only as finely as needed."""
    w, h = img.size
    left, top, cw, ch = box
    scale = min(cw, ch) / size  # how much the crop may shrink before it falls below the output
    if img.format == "JPEG" and scale >= 2:
        img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
    sx, sy = img.size[0] / w, img.size[1] / h
    if img.mode != "RGB":  # convert() copies even when the mode already matches
        img = img.convert("RGB")
    # reducing_gap: shrink by an integer box filter first when the crop is over 3x the output,
    # which PIL documents as indistinguishable from a full-support resample.
    return img.resize(
        (size, size),
        Image.BILINEAR,
        box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy),
        reducing_gap=3.0,
    )


def inception_crop_box(
    w: int, h: int, rng: np.random.Generator, min_area: float = 0.05, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop covering [min_area, 1] of the image."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(area * aspect)))
        ch = int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    # Ten misses (extreme aspect ratios): the largest centred crop within the ratio range.
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def draw_train_crop(
    w: int, h: int, rng: np.random.Generator, *, min_area: float, hflip: bool
) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box and flip of one training sample: the only draws before RandAugment, in this order.

    Both decode paths (`train_image` here, and the GPU path's readers) call this, so a sample
    gets the same crop and flip whichever decodes it."""
    box = inception_crop_box(w, h, rng, min_area)
    flip = hflip and rng.random() < 0.5
    return box, flip


def train_image(
    data: bytes, size: int, rng: np.random.Generator, *, min_area: float, hflip: bool, randaug: "RandAugment | None"
) -> np.ndarray:
    """JPEG bytes -> (size, size, 3) uint8, augmented for pretraining."""
    box, flip = draw_train_crop(*open_image(data).size, rng, min_area=min_area, hflip=hflip)
    out = crop_resize(decode_rgb(data), box, size, flip).permute(1, 2, 0).numpy()  # a view: HWC in memory
    if randaug is not None:
        out = np.asarray(randaug(Image.fromarray(out), rng), dtype=np.uint8)
    return out


def eval_image(data: bytes, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """JPEG bytes -> (size, size, 3) uint8: shorter side to size / crop_fraction, centre crop."""
    img = open_image(data)
    w, h = img.size
    side = min(w, h) * crop_fraction  # the centred square that ends up in the output
    box = ((w - side) / 2, (h - side) / 2, side, side)
    return np.asarray(_decode_region(img, box, size), dtype=np.uint8)


class RandAugment:
    """RandAugment (Cubuk et al.) as used by AugReg: `num_ops` random ops at magnitude `magnitude` / 10."""

    FILL = (128, 128, 128)

    def __init__(self, num_ops: int = 2, magnitude: int = 10):
        self.num_ops, self.level = num_ops, magnitude / 10.0
        self.ops = [
            self.auto_contrast, self.equalize, self.invert, self.rotate, self.posterize, self.solarize,
            self.color, self.contrast, self.brightness, self.sharpness, self.shear_x, self.shear_y,
            self.translate_x, self.translate_y,
        ]  # fmt: skip

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for i in rng.integers(0, len(self.ops), size=self.num_ops):
            sign = 1.0 if rng.random() < 0.5 else -1.0
            img = self.ops[i](img, sign * self.level)
        return img

    def auto_contrast(self, img, m):
        return ImageOps.autocontrast(img)

    def equalize(self, img, m):
        return ImageOps.equalize(img)

    def invert(self, img, m):
        return ImageOps.invert(img)

    def rotate(self, img, m):
        return img.rotate(30.0 * m, fillcolor=self.FILL)

    def posterize(self, img, m):
        return ImageOps.posterize(img, max(1, int(8 - 4 * abs(m))))

    def solarize(self, img, m):
        return ImageOps.solarize(img, int(256 - 256 * abs(m)))

    def _enhance(self, enhancer, img, m):
        return enhancer(img).enhance(1.0 + 0.9 * m)

    def color(self, img, m):
        return self._enhance(ImageEnhance.Color, img, m)

    def contrast(self, img, m):
        return self._enhance(ImageEnhance.Contrast, img, m)

    def brightness(self, img, m):
        return self._enhance(ImageEnhance.Brightness, img, m)

    def sharpness(self, img, m):
        return self._enhance(ImageEnhance.Sharpness, img, m)

    def shear_x(self, img, m):
        return img.transform(img.size, Image.AFFINE, (1, 0.3 * m, 0, 0, 1, 0), fillcolor=self.FILL)

    def shear_y(self, img, m):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0.3 * m, 1, 0), fillcolor=self.FILL)

    def translate_x(self, img, m):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0.45 * m * img.size[0], 0, 1, 0), fillcolor=self.FILL)

    def translate_y(self, img, m):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, 0.45 * m * img.size[1]), fillcolor=self.FILL)
