"""The embedded demo set: scikit-learn's 1,797 8x8 digits, stored upsampled to 32x32.

No download: the images ship inside scikit-learn. Upsampled so the ViT demo can use
patch size 4 or 8 on a 32x32 input, like CIFAR.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from data_prep.sources import register_source
from data_prep.sources.base import Listing, Source

SIZE = 32


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digit_png(image_8x8: np.ndarray) -> bytes:
    """One 8x8 digit (values 0..16) -> lossless 32x32 greyscale PNG, white ink on black."""
    pixels = np.round(image_8x8 * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@register_source("digits")
class DigitsSource(Source):
    samples_per_shard_hint = 128  # about a dozen train shards: enough for ranks x workers

    def list_items(self) -> Listing:
        _, target = _digits()
        n = len(target)
        items = pa.table(
            {
                "source_id": pa.array([f"digits/{i:04d}" for i in range(n)], pa.string()),
                "label": pa.array(target, pa.int32()),
                "row": pa.array(np.arange(n), pa.int32()),
            }
        )
        return Listing(items, [(str(c), str(c)) for c in range(10)], "single")

    def read(self, item: dict) -> bytes:
        images, _ = _digits()
        return digit_png(images[item["row"]])

    def fingerprint(self) -> dict:
        return {"kind": self.kind}
