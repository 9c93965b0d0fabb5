"""The training stream over real shards: ranks as processes, DataLoader workers as processes.

Every sample's target is its own id, so the tests check exactly which samples each step took.
"""

import functools
import http.server
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pretrain.data.loaders import DataConfig, build_eval_loader, build_train_loader
from sharding.plan import EpochPlan, StreamLayout
from sharding.shard_source import evict_least_recent
from sharding.stream import StreamError

sys.path.insert(0, str(Path(__file__).parent))
from stream_dataset import exclude, sample_ids, write_dataset  # noqa: E402

TRAIN = [37, 50, 41, 12, 60, 33, 45, 8, 29, 55]  # 370 samples: 23 steps of 16, remainder 2
VAL = [30, 25, 7]
GLOBAL_BATCH, IMG = 16, 16
RANK_SCRIPT = Path(__file__).parent / "stream_rank.py"


def data_cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), workers=2, shuffle_buffer=16, stream_width=4, stream_cycle=4, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stream") / "ds", {"train": TRAIN, "val": VAL})


def take(cfg, batches, *, world=1, rank=0, seed=0, state=None):
    """(images, targets) as the model gets them, from an in-process loader (its readers and decoders are real
    processes); returns (batches, state, counters)."""
    loader = build_train_loader(cfg, img_size=IMG, global_batch=GLOBAL_BATCH, rank=rank, world_size=world, seed=seed)
    if state:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append(loader.device_input(batch, "cpu"))
        if len(out) == batches:
            break
    return out, loader.state_dict(), loader.counters()


def run_ranks(tmp_path, cfg, world, batches, *, state=None, seed=0):
    """One process per rank; returns per-rank outputs (targets per batch, image digests, state)."""
    procs, outs = [], []
    for rank in range(world):
        spec = {"data": cfg.__dict__, "img_size": IMG, "global_batch": GLOBAL_BATCH, "rank": rank,
                "world_size": world, "seed": seed, "batches": batches, "state": state}  # fmt: skip
        spec_path, out_path = tmp_path / f"spec{world}-{rank}.json", tmp_path / f"out{world}-{rank}.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(spec_path), str(out_path)], env=env))
        outs.append(out_path)
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads(o.read_text()) for o in outs]


def global_steps(rank_outs):
    """Per step, the global batch: rank slices concatenated in rank order."""
    return [sum((o["batches"][s]["targets"] for o in rank_outs), []) for s in range(len(rank_outs[0]["batches"]))]


@pytest.mark.slow
def test_two_ranks_two_workers_each_sample_once_per_epoch(dataset, tmp_path):
    cfg = data_cfg(dataset)
    steps = sum(TRAIN) // GLOBAL_BATCH
    outs = run_ranks(tmp_path, cfg, world=2, batches=2 * steps)
    assert outs[0]["steps_per_epoch"] == outs[1]["steps_per_epoch"] == steps
    assert all(len(o["batches"]) == 2 * steps for o in outs)
    assert all(len(b["targets"]) == GLOBAL_BATCH // 2 for o in outs for b in o["batches"])
    order = global_steps(outs)
    ids = set(sample_ids(dataset, "train"))
    for epoch in range(2):
        taken = [i for batch in order[epoch * steps : (epoch + 1) * steps] for i in batch]
        assert len(taken) == len(set(taken)) == steps * GLOBAL_BATCH  # no duplicate
        left_out = ids - set(taken)
        assert len(left_out) == sum(TRAIN) % GLOBAL_BATCH  # the documented remainder
        plan = EpochPlan(TRAIN, StreamLayout(GLOBAL_BATCH, cfg.stream_width, cfg.stream_cycle), seed=0, epoch=epoch)
        assert len(left_out) == plan.remainder
    assert order[:steps] != order[steps:]  # epochs differ
    # Same seed, same order: one in-process rank without workers gives the very same global batches.
    single, _, _ = take(DataConfig(**{**cfg.__dict__, "workers": 0}), steps + 3)
    assert [t.tolist() for _, t in single] == order[: steps + 3]
    other_seed, _, _ = take(cfg, 3, seed=1)
    assert [t.tolist() for _, t in other_seed] != order[:3]


def test_interrupt_and_restore_gives_identical_next_batches(dataset):
    cfg = data_cfg(dataset)
    steps = sum(TRAIN) // GLOBAL_BATCH
    k = steps - 3
    full, _, _ = take(cfg, k + 6)
    first, state, _ = take(cfg, k)  # workers had prefetched more; the state counts only what was taken
    assert (state["epoch"], state["step"]) == (0, k)
    rest, _, _ = take(cfg, 6, state=state)  # crosses into epoch 1
    for (x0, y0), (x1, y1) in zip(full[k:], rest):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


@pytest.mark.slow
@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_covers_exactly_the_unconsumed(dataset, tmp_path, saved_world, resumed_world):
    cfg = data_cfg(dataset)
    steps = sum(TRAIN) // GLOBAL_BATCH
    k = 7 if saved_world == 2 else 9
    before = run_ranks(tmp_path, cfg, saved_world, k)
    state = before[0]["state"]
    assert all(o["state"] == state for o in before)  # the state is the same on every rank
    after = run_ranks(tmp_path, cfg, resumed_world, steps - k, state=state)
    consumed = [i for b in global_steps(before) for i in b]
    rest = [i for b in global_steps(after) for i in b]
    assert not set(consumed) & set(rest)
    assert len(consumed) + len(rest) == len(set(consumed) | set(rest)) == steps * GLOBAL_BATCH
    uninterrupted, _, _ = take(DataConfig(**{**cfg.__dict__, "workers": 0}), steps)
    assert rest == [i for _, t in uninterrupted[k:] for i in t.tolist()]


@pytest.fixture()
def damaged(tmp_path):
    """368 samples (23 full steps): shard 3 cut inside sample 6's JPEG, sample 2 of shard 5 garbled, 3 keys excluded."""
    counts = TRAIN[:-1] + [53]
    root = write_dataset(tmp_path / "damaged", {"train": counts})
    from sharding import open_dataset

    ds = open_dataset(root)
    rows = ds.sample_index("train", "train-000003").to_pylist()
    cut = rows[6]["jpg_offset"] + 100
    path = root / "shards/train-000003.tar"
    path.write_bytes(path.read_bytes()[:cut])
    row = ds.sample_index("train", "train-000005").to_pylist()[2]
    path = root / "shards/train-000005.tar"
    data = bytearray(path.read_bytes())
    data[row["jpg_offset"] : row["jpg_offset"] + row["jpg_size"]] = b"\x5a" * row["jpg_size"]
    path.write_bytes(bytes(data))
    excluded = [r["key"] for r in ds.sample_index("train", "train-000001").to_pylist()[10:13]]
    exclude(root, excluded)
    lost = {r["label"] for r in rows[6:]} | {row["label"]}
    lost |= {r["label"] for r in ds.sample_index("train", "train-000001").to_pylist()[10:13]}
    return root, counts, lost


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard_garbled_jpeg_and_exclusions_are_substituted_and_counted(damaged, caplog, verify):
    root, counts, lost = damaged
    cfg = data_cfg(root, max_error_rate=0.5, verify_samples=verify)
    steps = sum(counts) // GLOBAL_BATCH
    with caplog.at_level(logging.WARNING, logger="sharding.stream"):
        batches, _, counters = take(DataConfig(**{**cfg.__dict__, "workers": 0}), steps)
    # The index's digest catches the garbled JPEG before decoding; without it, decoding fails.
    garbled = "checksum" if verify else "decode_error"
    assert counters == {"truncated": 6, garbled: 1, "excluded": 3, "substituted": 10}
    taken = [i for _, t in batches for i in t.tolist()]
    assert len(taken) == steps * GLOBAL_BATCH  # batches stayed full
    assert not set(taken) & lost
    assert set(taken) == set(sample_ids(root, "train")) - lost
    assert len(taken) - len(set(taken)) == 10  # the only duplicates are the counted substitutes
    log = caplog.text
    assert "train-000003.tar sample 6" in log and "truncated" in log
    assert "train-000003.tar sample 5" not in log  # whole before the cut: kept
    assert f"train-000005.tar sample 2 (key train_000005_000002): {garbled}; substituted" in log
    assert "train-000003.tar sample 7 (key train_000003_000007): truncated; substituted" in log
    # With workers, the same substitutes (the stream is the same however it is read).
    with_workers, _, counters2 = take(cfg, steps)
    assert counters2 == counters
    assert [t.tolist() for _, t in with_workers] == [t.tolist() for _, t in batches]


def test_error_rate_over_the_limit_aborts_with_a_clear_message(damaged):
    root, counts, _ = damaged
    cfg = DataConfig(**{**data_cfg(root).__dict__, "workers": 0, "max_error_rate": 0.001})
    with pytest.raises(
        StreamError, match=r"unusable \(checksum=\d+, excluded=\d+, truncated=\d+\), over data.max_error_rate=0.001"
    ):
        take(cfg, sum(counts) // GLOBAL_BATCH)


@pytest.fixture()
def http_root(dataset):
    handler = functools.partial(_QuietHandler, directory=str(dataset))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server answering byte-range requests, as object stores do."""

    def log_message(self, *args):
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(match.group(1))
        end = min(size - 1, int(match.group(2) or size - 1))
        f = open(path, "rb")
        f.seek(start)
        body = io.BytesIO(f.read(end + 1 - start))
        f.close()
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        return body


def test_remote_shards_over_http_with_and_without_node_cache(dataset, http_root, tmp_path):
    local, _, _ = take(data_cfg(dataset), 8)
    cache = tmp_path / "cache"
    cached, _, _ = take(data_cfg(dataset, shards_url=http_root, cache_dir=str(cache)), 8)
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(local, cached)] == [True] * 8
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(f.endswith(".tar") for f in files) and len(files) <= len(TRAIN)
    direct, _, _ = take(DataConfig(**{**data_cfg(dataset, shards_url=http_root).__dict__, "workers": 0}), 3)
    assert [t.tolist() for _, t in direct] == [t.tolist() for _, t in local[:3]]


def test_bounded_node_cache_evicts_and_still_yields_the_same_batches(dataset, http_root, tmp_path):
    sizes = sorted(p.stat().st_size for p in Path(dataset).rglob("train-*.tar"))
    bound = sizes[-1] + sizes[-2]  # room for about two shards of the ten
    local, _, _ = take(data_cfg(dataset), 8)
    cache = tmp_path / "cache"
    cached, _, _ = take(data_cfg(dataset, shards_url=http_root, cache_dir=str(cache), cache_max_gb=bound / 1e9), 8)
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(local, cached)] == [True] * 8
    kept = [p for p in cache.iterdir() if p.name.endswith(".tar")]
    # Two workers fetch concurrently: one may add its shard just after the other evicted.
    assert 1 <= len(kept) < len(TRAIN) and sum(p.stat().st_size for p in kept) <= bound + sizes[-1]


def test_eviction_goes_by_last_use_and_keeps_the_new_shard(tmp_path):
    for age, name in enumerate(["new.tar", "recent.tar", "old.tar", "oldest.tar"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1_000_000 - age * 10, 1_000_000 - age * 10))
    (tmp_path / ".partial.tmp").write_bytes(b"x" * 100)  # another worker's download: never touched
    evict_least_recent(tmp_path, 250, keep=tmp_path / "new.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial.tmp", "new.tar", "recent.tar"]
    evict_least_recent(tmp_path, 50, keep=tmp_path / "new.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial.tmp", "new.tar"]


def test_eval_loader_yields_every_sample_once_across_ranks(dataset):
    cfg = data_cfg(dataset)
    seen, counts = [], []
    for rank in range(2):
        loader = build_eval_loader(cfg, "val", img_size=IMG, batch_size=8, rank=rank, world_size=2)
        counts.append(len(loader))
        for images, targets, valid in loader:
            assert images.shape == (8, IMG, IMG, 3) and images.dtype == torch.uint8
            seen += targets[valid].tolist()
    assert counts[0] == counts[1] == len(list(loader))
    assert sorted(seen) == sorted(sample_ids(dataset, "val"))


def test_mixup_targets_are_mixed_one_hot_rows(dataset):
    cfg = DataConfig(**{**data_cfg(dataset).__dict__, "workers": 0, "mixup_alpha": 0.5})
    plain, _, _ = take(DataConfig(**{**cfg.__dict__, "mixup_alpha": 0.0}), 1)
    ((images, targets),) = take(cfg, 1)[0]
    ids = plain[0][1]
    assert targets.shape == (GLOBAL_BATCH, sum(TRAIN) + sum(VAL)) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(GLOBAL_BATCH))
    lam = targets[0, ids[0]].item()
    assert 0 < lam < 1 and torch.allclose(targets[0, ids[-1]], torch.tensor(1 - lam))  # mixed with its neighbour
    assert torch.allclose(images[0], lam * plain[0][0][0] + (1 - lam) * plain[0][0][-1], atol=1e-5)


def test_multi_label_samples_become_multi_hot_rows():
    from stream_dataset import jpeg

    from pretrain.data.loaders import SampleDecoder
    from sharding.tar_reader import ShardSample

    decode = SampleDecoder(DataConfig(), 16, train=True, num_classes=5, multi_label=True)
    image, target = decode(ShardSample("k", {"jpg": jpeg(0), "labels.json": b"[0, 3]"}), (0,))
    assert image.shape == (16, 16, 3) and target.tolist() == [1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        decode(ShardSample("k", {"jpg": jpeg(0), "labels.json": b"[7]"}), (0,))
    with pytest.raises(KeyError):
        decode(ShardSample("k", {"jpg": jpeg(0)}), (0,))


def test_plan_report_matches_the_loader(dataset, capsys):
    from sharding.plan_report import main

    assert main([str(dataset), "--global-batch", "16", "--world-size", "2", "--readers", "2", "--width", "4",
                 "--cycle", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "370 samples in 10 shards -> 16 partitions" in out
    assert "23 steps/epoch of 16 (8 per rank); 2 samples left out" in out
    assert main([str(dataset), "--global-batch", "16", "--world-size", "3"]) == 2
    assert "world size 3 does not divide data.stream_width" in capsys.readouterr().err
