"""Readers apart from decoders, uint8 batches and the device input path, over real shards and processes.

- the model's input (normalised on the device, Mixup there) equals what the loader's workers
  computed before batches became uint8: the same arithmetic, the same Mixup weight;
- the batches do not depend on the number of decoders, and a run resumed with another pool
  size continues exactly where the uninterrupted one would be;
- a failing or dying reader or decoder ends the iteration with its message;
- a sample whose header reads but whose data does not decode is replaced inside its piece,
  with its own augmentation key, and counted.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.decode_pool import ReaderDecoderPool, StepWork
from pretrain.data.loaders import DataConfig, Prepared, SampleDecoder, build_train_loader
from pretrain.model import create_model

sys.path.insert(0, str(Path(__file__).parent))
from stream_dataset import jpeg, write_dataset  # noqa: E402

TRAIN = [37, 50, 41, 12, 60, 33, 45, 8, 29, 55]
GLOBAL_BATCH, IMG = 16, 16
MIXUP_TAG = 0x313  # the loader's stream of Mixup weights


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pool") / "ds", {"train": TRAIN})


def cfg_for(path, **kw) -> DataConfig:
    base = dict(path=str(path), workers=2, readers=2, shuffle_buffer=16, stream_width=4, stream_cycle=4)
    return DataConfig(**{**base, **kw})


def host_batches(cfg, count, state=None, seed=0):
    loader = build_train_loader(cfg, img_size=IMG, global_batch=GLOBAL_BATCH, rank=0, world_size=1, seed=seed)
    if state:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out, loader.state_dict(), loader


def test_device_input_gives_the_normalised_and_mixed_batch_the_workers_used_to_make(dataset):
    cfg = cfg_for(dataset, workers=0, mixup_alpha=0.5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    batches, _, loader = host_batches(cfg, 3, seed=7)
    for batch in batches:
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (GLOBAL_BATCH, IMG, IMG, 3)
        # What the workers computed before: float32 copy, x * 1/(255 s) - m/s, then Mixup with
        # the weight drawn from the stream's state for (seed, epoch, step, rank).
        m = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        s = torch.tensor(cfg.std).view(1, 3, 1, 1)
        want = torch.empty((GLOBAL_BATCH, 3, IMG, IMG)).copy_(batch.images.permute(0, 3, 1, 2))
        want.mul_(1.0 / (255.0 * s)).sub_(m / s)
        lam = float(np.random.default_rng([7, batch.epoch, batch.step, 0, MIXUP_TAG]).beta(0.5, 0.5))
        hot = torch.nn.functional.one_hot(batch.targets, loader.split.num_classes).float()
        want_x = lam * want + (1 - lam) * want.roll(1, dims=0)
        want_y = lam * hot + (1 - lam) * hot.roll(1, dims=0)
        assert batch.mix_weight == lam
        x, y = loader.device_input(batch, "cpu")
        assert x.dtype == torch.float32 and torch.equal(x, want_x) and torch.equal(y, want_y)


def test_the_model_refuses_uint8_images():
    model = create_model("vit_ti16", img_size=16, num_classes=3)
    with pytest.raises(TypeError, match="uint8.*DeviceInput"):
        model(torch.zeros((1, 3, 16, 16), dtype=torch.uint8))


def test_same_batches_for_any_pool_size_and_resume_with_another(dataset):
    steps = sum(TRAIN) // GLOBAL_BATCH
    k = steps - 3
    reference, _, _ = host_batches(cfg_for(dataset, workers=0), k + 6)
    first, state, _ = host_batches(cfg_for(dataset, workers=2), k)
    rest, _, _ = host_batches(cfg_for(dataset, workers=3, readers=4), 6, state=state)  # crosses into epoch 1
    assert (state["epoch"], state["step"]) == (0, k)
    for want, got in zip(reference, first + rest, strict=True):
        assert (want.epoch, want.step) == (got.epoch, got.step)
        assert torch.equal(want.images, got.images) and torch.equal(want.targets, got.targets)


def _steps(n_steps, pieces):
    def read(reader, readers):
        for seq in range(reader, n_steps, readers):
            yield StepWork([(seq, i) for i in range(pieces)], seq)

    return read


def _slow_decode(piece):
    seq, i = piece
    time.sleep(0.001 * ((seq * 7 + i * 3) % 5))  # pieces finish out of order
    return seq * 100 + i


def test_pool_reassembles_steps_in_order_whatever_finishes_first():
    pool = ReaderDecoderPool(_steps(40, 3), _slow_decode, lambda meta, done: (meta, done), readers=2, decoders=3,
                             ahead=2)  # fmt: skip
    got = list(pool)
    assert got == [(s, [s * 100, s * 100 + 1, s * 100 + 2]) for s in range(40)]


def _fails_on_step_5(piece):
    if piece == (5, 1):
        raise ValueError("piece (5, 1) is broken")
    return piece


def _dies_on_step_3(piece):
    if piece[0] == 3:
        os._exit(3)
    return piece


@pytest.mark.parametrize(
    "decode, message",
    [(_fails_on_step_5, r"loader decoder \d failed:(.|\n)*ValueError: piece \(5, 1\) is broken"),
     (_dies_on_step_3, r"loader decoder \d died with exit code 3")],
)  # fmt: skip
def test_a_failing_or_dying_decoder_ends_the_iteration_with_its_message(decode, message):
    pool = ReaderDecoderPool(_steps(40, 2), decode, lambda meta, done: meta, readers=1, decoders=2, ahead=2)
    seen = []
    with pytest.raises(RuntimeError, match=message):
        for step in pool:
            seen.append(step)
    assert seen == list(range(len(seen))) and len(seen) <= 5


def test_a_failing_reader_ends_the_iteration_with_its_message():
    def read(reader, readers):
        yield StepWork([], 0)
        raise OSError("shard train-000007.tar: connection reset")

    with pytest.raises(RuntimeError, match=r"loader reader 0 failed:(.|\n)*connection reset"):
        list(ReaderDecoderPool(read, _slow_decode, lambda meta, done: meta, readers=1, decoders=1, ahead=2))


def test_a_sample_that_does_not_decode_is_replaced_inside_its_piece_with_its_own_key():
    decoder = SampleDecoder(DataConfig(), IMG, train=True, num_classes=4, multi_label=False)
    good = [Prepared(f"s{i}", jpeg(i, size=40), i, (0, 0, 0, i)) for i in range(4)]
    truncated = Prepared("s2", jpeg(2, size=40)[:300], 2, (0, 0, 0, 2))  # the header reads, the data ends early
    pixels, counters = decoder.decode_piece([good[0], good[1], truncated, good[3]])
    assert counters == {"decode_error": 1, "substituted": 1}
    np.testing.assert_array_equal(pixels[2], decoder.pixels(Prepared("s1", good[1].jpeg, 1, (0, 0, 0, 2))))
    np.testing.assert_array_equal(pixels[3], decoder.pixels(good[3]))
    first_bad, counters = decoder.decode_piece([truncated, good[3]])  # nothing earlier: the nearest later one
    assert counters["decode_error"] == 1
    np.testing.assert_array_equal(first_bad[0], decoder.pixels(Prepared("s3", good[3].jpeg, 3, truncated.key)))
