"""Image transforms: crop geometry, reduced-size decode fidelity, eval crop, normalisation, mixup."""

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pretrain.data import transforms as T
from pretrain.data.device_input import DeviceInput, mixup


def _jpeg(pixels: np.ndarray, quality=92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return _jpeg(skimage.data.astronaut())  # 512 x 512 real photo


def test_inception_crop_area_and_ratio_bounds():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        left, top, w, h = T.inception_crop_box(640, 480, rng, min_area=0.05)
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 480
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        areas.append(w * h / (640 * 480))
    assert min(areas) >= 0.05 - 0.005 and max(areas) <= 1.0
    assert min(areas) < 0.07  # the official 5% floor is reached, not torchvision's 8%
    # Extreme aspect ratios fall back to the largest centred crop inside the ratio range.
    assert T.inception_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)


def test_reduced_size_decode_matches_full_decode(photo):
    box = (0, 0, 512, 512)
    reduced = T._decode_region(T.open_image(photo), box, 128)  # 4x smaller: DCT-scaled decode
    full = Image.open(io.BytesIO(photo)).convert("RGB").resize((128, 128), Image.BILINEAR, reducing_gap=None)
    diff = np.abs(np.asarray(reduced, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 4.0
    img = T.open_image(photo)
    T._decode_region(img, box, 128)
    assert img.size == (128, 128)  # the JPEG was decoded at a quarter of its size


def test_train_image_is_deterministic_per_key_and_flips(photo):
    a = T.train_image(photo, 64, np.random.default_rng([1, 2]), min_area=0.05, hflip=True, randaug=None)
    b = T.train_image(photo, 64, np.random.default_rng([1, 2]), min_area=0.05, hflip=True, randaug=None)
    c = T.train_image(photo, 64, np.random.default_rng([1, 3]), min_area=0.05, hflip=True, randaug=None)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ra = T.RandAugment(2, 15)
    d = T.train_image(photo, 64, np.random.default_rng(7), min_area=0.05, hflip=False, randaug=ra)
    e = T.train_image(photo, 64, np.random.default_rng(7), min_area=0.05, hflip=False, randaug=ra)
    assert np.array_equal(d, e)


def test_eval_centre_crop_and_normalisation():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 50:150] = 255  # the centred square is white, the sides black
    out = T.eval_image(_jpeg(pixels, 100), 32)
    assert out.shape == (32, 32, 3) and out[4:-4, 4:-4].min() > 240
    x = DeviceInput((0.5,) * 3, (0.5,) * 3).images(torch.from_numpy(np.stack([out, np.zeros_like(out)])), "cpu")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[0].max() == 1.0 and x[1].min() == -1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; we refuse
def test_pixel_limit_is_checked_before_decoding():
    # A JPEG whose frame header claims 10000 x 10000 pixels: refused from the header alone.
    data = bytearray(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2
    with pytest.raises(ValueError, match="pixel limit"):
        T.open_image(bytes(data))


def test_mixup_mixes_images_and_targets_alike():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    y = torch.eye(4)
    mx, my = mixup(x, y, 0.3)
    lam = my[0, 0].item()
    assert lam == pytest.approx(0.3)
    assert torch.allclose(my.sum(1), torch.ones(4))
    assert torch.allclose(mx[1], lam * x[1] + (1 - lam) * x[0])
