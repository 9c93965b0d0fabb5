"""The byte-level tar reader: grouping as webdataset does, long names, seeking, damage."""

import io
import tarfile

import pytest
import webdataset as wds

from sharding.tar_reader import ShardDamage, TruncatedShard, iter_samples, skip_samples, split_key


def _tar(samples, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES = [
    ("a0", [("jpg", b"x" * 700), ("cls", b"0")]),
    ("dir/a1", [("jpg", b"y" * 513), ("labels.json", b"[1, 2]")]),
    ("d/" + "\u00e9" * 120 + "a2", [("jpg", b"z" * 10), ("cls", b"2")]),  # needs a pax long-name record
    ("a3", [("jpg", b""), ("cls", b"3")]),
]


def test_samples_match_webdataset_grouping(tmp_path):
    raw = _tar(SAMPLES)
    ours = [(s.key, s.members) for s in iter_samples(io.BytesIO(raw))]
    assert ours == [(k, dict(m)) for k, m in SAMPLES]
    path = tmp_path / "x.tar"
    path.write_bytes(raw)
    theirs = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert [k for k, _ in ours] == theirs
    assert split_key("dir/abc.labels.json") == ("dir/abc", "labels.json")


@pytest.mark.parametrize("skip", range(5))
def test_skip_lands_on_the_next_sample(skip):
    f = io.BytesIO(_tar(SAMPLES))
    if skip < 4:
        skip_samples(f, skip)
        assert [s.key for s in iter_samples(f)] == [k for k, _ in SAMPLES[skip:]]
    else:
        with pytest.raises(TruncatedShard):
            skip_samples(f, skip + 1)


def test_truncation_keeps_whole_samples_and_raises():
    raw = _tar(SAMPLES)
    got = []
    with pytest.raises(TruncatedShard):
        for s in iter_samples(io.BytesIO(raw[:2600])):  # inside the header of a1.jpg
            got.append(s.key)
    assert got == ["a0"]


def test_corrupt_header_is_damage():
    raw = bytearray(_tar(SAMPLES))
    raw[0:4] = b"\x00\x01\x02\x03"
    with pytest.raises(ShardDamage, match="checksum"):
        list(iter_samples(io.BytesIO(bytes(raw))))
