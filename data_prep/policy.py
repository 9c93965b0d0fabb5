"""The image policy: every converted image becomes an 8-bit RGB JPEG of bounded size.

Checks run cheapest first, and everything that can be judged from the header (pixel
count, sides, aspect ratio) is judged before a single pixel is decoded, so a
decompression bomb costs a header read, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Rejection reasons (recorded in rejected.parquet; sources add their own, e.g. unreadable).
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect"

_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)


@dataclass
class ImagePolicy:
    """How images are checked and normalised; recorded in dataset.json."""

    max_short_side: int = 512  # resize so the shorter side is at most this (0: no limit)
    max_side: Optional[int] = None  # if set, bound the longer side instead of the shorter
    quality: int = 90  # JPEG quality of re-encoded images
    pass_through: bool = True  # keep the original bytes of RGB JPEGs that already conform
    min_side: int = 8  # reject images whose shorter side is below this
    max_aspect: float = 20.0  # reject images whose long/short side ratio exceeds this
    max_pixels: int = 100_000_000  # reject images whose header claims more pixels

    def validate(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"policy.quality must be in 1..100, got {self.quality}")
        if self.max_short_side < 0 or (self.max_side is not None and self.max_side < 1):
            raise ValueError("policy.max_short_side must be >= 0 and policy.max_side >= 1")
        if self.min_side < 1 or self.max_aspect < 1 or self.max_pixels < 1:
            raise ValueError("policy.min_side, max_aspect and max_pixels must be >= 1")

    def describe(self) -> dict:
        return {
            **asdict(self),
            "format": "JPEG",
            "mode": "RGB 8-bit",
            "alpha": "composited on white",
            "exif_orientation": "applied",
            "resample": "Lanczos (JPEG DCT draft scaling first)",
        }

    def target_size(self, w: int, h: int) -> tuple[int, int]:
        """The output size of an upright w x h image: aspect kept, never upscaled."""
        if self.max_side is not None:
            scale = self.max_side / max(w, h)
        elif self.max_short_side:
            scale = self.max_short_side / min(w, h)
        else:
            scale = 1.0
        if scale >= 1.0:
            return w, h
        return max(1, round(w * scale)), max(1, round(h * scale))


@dataclass(frozen=True)
class ConvertedImage:
    jpeg: bytes
    orig_size: tuple[int, int]  # (width, height) as stored in the source, before EXIF rotation
    size: tuple[int, int]  # (width, height) of the JPEG
    passed_through: bool


class Rejected(Exception):
    """An input that is not converted: `reason` is a short code, `detail` a human line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _open(data: bytes) -> Image.Image:
    if not data:
        raise Rejected(EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check decides; Pillow's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE, "no known image header") from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise _decode_error(e) from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is ignored, as browsers do
        return 1


def _decode_error(e: Exception) -> Rejected:
    msg = str(e)
    truncated = "truncated" in msg.lower() or "broken data stream" in msg.lower()
    return Rejected(TRUNCATED if truncated else UNDECODABLE, f"{type(e).__name__}: {msg}")


def _decode(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as e:
        raise _decode_error(e) from None


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency over white; 16-bit scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):  # 16-bit greyscale PNG/TIFF arrive as I;16* or I
        a = np.asarray(img).astype(np.int64)
        a = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def convert_image(data: bytes, policy: ImagePolicy) -> ConvertedImage:
    """Check and normalise one encoded image; raises Rejected with the reason."""
    img = _open(data)
    w, h = img.size
    if w * h > policy.max_pixels:
        raise Rejected(TOO_MANY_PIXELS, f"header says {w}x{h} > {policy.max_pixels} pixels")
    if min(w, h) < policy.min_side:
        raise Rejected(TOO_SMALL, f"{w}x{h}, shorter side < {policy.min_side}")
    if max(w, h) / min(w, h) > policy.max_aspect:
        raise Rejected(EXTREME_ASPECT, f"{w}x{h}, aspect > {policy.max_aspect}")
    orientation = _orientation(img)
    swaps = orientation in (5, 6, 7, 8)
    upright = (h, w) if swaps else (w, h)
    target = policy.target_size(*upright)

    if policy.pass_through and img.format == "JPEG" and img.mode == "RGB" and orientation == 1 and target == (w, h):
        _decode(img)  # proves the bytes are whole before they are kept as they are
        return ConvertedImage(data, (w, h), (w, h), passed_through=True)

    if img.format == "JPEG" and target != upright:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size.
        img.draft(img.mode, (target[1], target[0]) if swaps else target)
    _decode(img)
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    img = to_rgb(img)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return ConvertedImage(_encode(img, policy.quality), (w, h), img.size, passed_through=False)
