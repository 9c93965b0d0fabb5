"""GPU decode path (data.decode: gpu), run with device=cpu: the same crops, flips and pixels as the
CPU path, both within a stated PSNR of PIL's decode and resize, CUDA's floating-point resize within
a stated PSNR of the CPU's, the CPU fallback for rejected JPEGs, the refusal of RandAugment."""

import io

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.data import gpu_decode as G
from pretrain.data import transforms as T
from sharding.stream import StreamError
from vitscale_common.errors import UserError

SIZE = 224
# Measured on the 200 photos below at 224 px (`pytest -s` prints them; docs/DATA_STREAM.md): against PIL's
# full-resolution decode and BILINEAR resize of the same box, min 47.4 dB, median 62.3 dB; the
# floating-point resize CUDA runs against the CPU's fixed-point one, min 55.3 dB.
MIN_PSNR_PIL, MEDIAN_PSNR_PIL = 45.0, 55.0
MIN_PSNR_FLOAT_RESIZE = 50.0


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sample(i: int) -> bytes:
    """Real photos re-encoded at 300-900 px on the long side; every fifth grey, some stretched."""
    rng = np.random.default_rng([99, i])
    photo = (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea, skimage.data.rocket)[i % 4]
    img = Image.fromarray(photo())
    long_side = int(rng.integers(300, 901))
    aspect = img.width / img.height * float(rng.choice([1.0, 1.0, 2.5, 0.4]))
    if aspect >= 1:
        w, h = long_side, max(8, round(long_side / aspect))
    else:
        w, h = max(8, round(long_side * aspect)), long_side
    img = img.resize((w, h), Image.LANCZOS)
    if i % 5 == 0:
        img = img.convert("L")
    return _encode(img, int(rng.integers(75, 96)))


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [_sample(i) for i in range(200)]


def _settings(i: int) -> dict:
    return {"min_area": 0.05 if i % 3 else 0.3, "hflip": i % 7 != 0}


def _key(i: int) -> list[int]:
    return [7, i]


def _cpu_path(jpegs: list[bytes]) -> list[np.ndarray]:
    return [
        T.train_image(j, SIZE, np.random.default_rng(_key(i)), randaug=None, **_settings(i))
        for i, j in enumerate(jpegs)
    ]


def _plans(jpegs: list[bytes]) -> list[G.CropPlan]:
    return [G.plan_crop(j, np.random.default_rng(_key(i)), **_settings(i)) for i, j in enumerate(jpegs)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _hwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(0, 2, 3, 1).numpy()


def test_reader_plans_the_crops_and_flips_the_cpu_path_draws(jpegs, monkeypatch):
    drawn = []
    draw = T.draw_train_crop

    def recording(*args, **kwargs):
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    with monkeypatch.context() as m:
        m.setattr(T, "draw_train_crop", recording)
        _cpu_path(jpegs)
    assert len(drawn) == len(jpegs)
    plans = _plans(jpegs)
    assert [(p.box, p.flip) for p in plans] == drawn
    flips = [p.flip for p in plans]
    assert 50 < sum(flips) < 150  # both flips occur, so the comparison covers the flip draw


def test_decode_crops_makes_the_cpu_paths_pixels_and_pils_within_the_stated_psnr(jpegs):
    plans = _plans(jpegs)
    batch = G.JpegBatch.pack(jpegs, plans)
    counters: dict[str, int] = {}
    out = G.decode_crops(batch, SIZE, "cpu", counters)
    assert out.shape == (200, 3, SIZE, SIZE) and out.dtype == torch.uint8
    assert counters == {}
    got = _hwc(out)
    assert all(np.array_equal(g, c) for g, c in zip(got, _cpu_path(jpegs)))  # one code for both paths

    # Against PIL's full-resolution decode and BILINEAR resize of the same box and flip.
    def pil(jpeg: bytes, plan: G.CropPlan) -> np.ndarray:
        left, top, w, h = plan.box
        img = (
            Image.open(io.BytesIO(jpeg))
            .convert("RGB")
            .resize((SIZE, SIZE), Image.BILINEAR, (left, top, left + w, top + h))
        )
        return np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT) if plan.flip else img)

    psnr = np.array([_psnr(g, pil(j, p)) for g, j, p in zip(got, jpegs, plans)])
    print(f"against PIL: PSNR min {psnr.min():.1f} dB, median {np.median(psnr):.1f} dB")  # shown by pytest -s
    assert psnr.min() >= MIN_PSNR_PIL and np.median(psnr) >= MEDIAN_PSNR_PIL, (psnr.min(), np.median(psnr))


def test_the_float_resize_cuda_runs_is_within_the_stated_psnr_of_the_cpus(jpegs):
    """crop_resize on a GPU resizes in floating point (CUDA has no uint8 antialiased kernel);
    that arithmetic, run here, against the CPU's fixed-point kernel for the same crops."""
    psnr = []
    for jpeg, plan in zip(jpegs, _plans(jpegs)):
        image = T.decode_rgb(jpeg)
        left, top, w, h = plan.box
        crop = image[None, :, top : top + h, left : left + w].float()
        resized = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        floating = resized[0].round().to(torch.uint8)
        floating = floating.flip(-1) if plan.flip else floating
        psnr.append(_psnr(floating.numpy(), T.crop_resize(image, plan.box, SIZE, plan.flip).numpy()))
    print(f"float resize against fixed-point: PSNR min {min(psnr):.1f} dB")  # shown by pytest -s
    assert min(psnr) >= MIN_PSNR_FLOAT_RESIZE


def test_a_jpeg_the_device_decoder_rejects_is_decoded_with_pil_and_counted(jpegs, monkeypatch):
    cmyk = _encode(Image.fromarray(skimage.data.coffee()).convert("CMYK"), 90)
    batch_jpegs = [*jpegs[:3], cmyk, *jpegs[3:6]]
    keys = [_key(i) for i in range(3)] + [[7, 1000]] + [_key(i) for i in range(3, 6)]
    plans = [G.plan_crop(j, np.random.default_rng(k), min_area=0.05, hflip=True) for j, k in zip(batch_jpegs, keys)]
    batch = G.JpegBatch.pack(batch_jpegs, plans)
    expected_others = G.decode_crops(batch, SIZE, "cpu")

    # A decoder without CMYK support, as a device decoder may be; it fails the whole batch call.
    decode = G.decode_jpeg

    def without_cmyk(inputs, **kwargs):
        if any(bytes(t.numpy()) == cmyk for t in (inputs if isinstance(inputs, list) else [inputs])):
            raise RuntimeError("unsupported JPEG")
        return decode(inputs, **kwargs)

    monkeypatch.setattr(G, "decode_jpeg", without_cmyk)
    counters: dict[str, int] = {}
    out = G.decode_crops(batch, SIZE, "cpu", counters)
    assert counters == {"decode_cpu_fallback": 1}
    others = [i for i in range(len(batch)) if i != 3]
    assert torch.equal(out[others], expected_others[others])
    cpu_path = T.train_image(cmyk, SIZE, np.random.default_rng(keys[3]), min_area=0.05, hflip=True, randaug=None)
    assert _psnr(_hwc(out[3:4])[0], cpu_path) >= MIN_PSNR_PIL


def test_a_jpeg_no_decoder_reads_is_replaced_by_a_neighbour_and_counted(jpegs):
    truncated = jpegs[4][: len(jpegs[4]) // 2]  # the header reads, so the reader plans it
    plan = G.plan_crop(truncated, np.random.default_rng(0), min_area=0.05, hflip=True)
    good = _plans(jpegs[:2])
    counters: dict[str, int] = {}
    out = G.decode_crops(G.JpegBatch.pack([truncated, *jpegs[:2]], [plan, *good]), SIZE, "cpu", counters)
    assert torch.equal(out[0], out[1])  # no earlier sample: the nearest later one
    out = G.decode_crops(G.JpegBatch.pack([*jpegs[:2], truncated], [*good, plan]), SIZE, "cpu", counters)
    assert torch.equal(out[2], out[1])  # the nearest earlier one
    assert counters == {"decode_error": 2, "substituted": 2}
    with pytest.raises(StreamError, match="no JPEG of a batch of 2 decodes"):
        G.decode_crops(G.JpegBatch.pack([truncated] * 2, [plan] * 2), SIZE, "cpu")


def test_bytes_that_are_no_jpeg_make_the_reader_plan_raise():
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "PNG")
    with pytest.raises(ValueError, match="JPEGs only, this sample is PNG"):
        G.plan_crop(buf.getvalue(), np.random.default_rng(0), min_area=0.05, hflip=True)
    with pytest.raises(OSError):  # PIL cannot identify them
        G.plan_crop(b"\xff\xd8 not really a jpeg", np.random.default_rng(0), min_area=0.05, hflip=True)


def test_pack_and_unpack_round_trip_as_views():
    blobs = [b"abc", b"", bytes(range(256)), b"\xff\xd8\xff\xd9"]
    data, offsets = G.pack_jpegs(blobs)
    assert data.dtype == torch.uint8 and data.shape == (263,)
    assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 3, 3, 259, 263]
    views = G.unpack_jpegs(data, offsets)
    assert [bytes(v.numpy()) for v in views] == blobs
    assert all(v.untyped_storage().data_ptr() == data.untyped_storage().data_ptr() for v in views)

    plans = [G.CropPlan((i, 2 * i, 10 + i, 20 + i), i % 2 == 1) for i in range(4)]
    batch = G.JpegBatch.pack(blobs, plans)
    assert len(batch) == 4 and [bytes(v.numpy()) for v in batch.jpegs()] == blobs
    assert batch.boxes.dtype == torch.int32 and batch.boxes.tolist() == [list(p.box) for p in plans]
    assert batch.flips.tolist() == [False, True, False, True]
    assert batch.pin_memory() is batch and batch.to("cpu", non_blocking=True) is batch
    empty = G.JpegBatch.pack([], [])
    assert empty.boxes.shape == (0, 4) and G.decode_crops(empty, 8, "cpu").shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="2 JPEGs but 1 crop plans"):
        G.JpegBatch.pack(blobs[:2], plans[:1])


def test_randaugment_is_refused_on_the_gpu_path():
    G.check_gpu_decode_config(0)
    with pytest.raises(UserError) as e:
        G.check_gpu_decode_config(2)
    assert str(e.value) == (
        "data.decode=gpu does not support data.randaugment_ops > 0 (RandAugment runs on PIL images); "
        "use data.decode=cpu"
    )
