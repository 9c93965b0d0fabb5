"""Image policy: output sizes, draft decoding, pass-through rules."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.policy import ImagePolicy, Rejected, convert_image


def _jpeg(w, h, exif=None, mode="RGB"):
    x = np.linspace(0, 255, w, dtype=np.uint8)
    img = Image.fromarray(np.stack([np.tile(x, (h, 1))] * 3, -1), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **({"exif": exif} if exif else {}))
    return buf.getvalue()


@pytest.mark.parametrize(
    "policy,size,want",
    [
        (ImagePolicy(max_short_side=256), (1000, 600), (427, 256)),
        (ImagePolicy(max_short_side=256), (200, 300), (200, 300)),  # never upscaled
        (ImagePolicy(max_side=300), (1000, 600), (300, 180)),
        (ImagePolicy(max_short_side=0), (1000, 600), (1000, 600)),
    ],
)
def test_target_sizes(policy, size, want):
    assert policy.target_size(*size) == want


def test_large_jpeg_is_draft_decoded_to_the_exact_target():
    out = convert_image(_jpeg(1600, 1200), ImagePolicy(max_short_side=150))
    img = Image.open(io.BytesIO(out.jpeg))
    assert out.size == img.size == (200, 150) and out.orig_size == (1600, 1200) and not out.passed_through
    # The gradient survives: left dark, right bright.
    a = np.asarray(img.convert("L")).astype(int)
    assert a[:, :10].mean() < 20 and a[:, -10:].mean() > 235


def test_rotated_and_resized_together():
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated 90 degrees counter-clockwise
    out = convert_image(_jpeg(800, 400, exif.tobytes()), ImagePolicy(max_short_side=100))
    assert out.size == (100, 200) and Image.open(io.BytesIO(out.jpeg)).size == (100, 200)


def test_pass_through_only_for_conforming_rgb_jpegs():
    small = _jpeg(120, 90)
    assert convert_image(small, ImagePolicy()).jpeg == small
    assert convert_image(small, ImagePolicy(pass_through=False)).jpeg != small
    grey = _jpeg(120, 90, mode="L")
    out = convert_image(grey, ImagePolicy())
    assert not out.passed_through and Image.open(io.BytesIO(out.jpeg)).mode == "RGB"


def test_the_pixel_limit_is_judged_from_the_header():
    with pytest.raises(Rejected) as e:
        convert_image(_jpeg(400, 300), ImagePolicy(max_pixels=100_000))
    assert e.value.reason == "too_many_pixels" and "400x300" in e.value.detail
