"""De-duplicate a pretraining shard dataset against downstream test sets (paper section 4.1).

Transfer numbers are honest only if the pretraining data holds no copy of a test image.
Two kinds of copy are found:
- exact: the same decoded pixels (sha256 over shape + RGB bytes), whatever the encoding;
- near: the same picture resized (0.5x-2x), re-encoded as JPEG (quality 60+) or cropped
  by up to about 10%.

A near-duplicate signature has two parts, both taken from the centre 80% of the image
(trimming the border makes small crops mostly remove content the signature never saw):
- a 143-bit perceptual hash: signs, against their median, of the 12x12 lowest-frequency
  DCT coefficients (without DC) of a 32x32 grey thumbnail: robust to resizing and JPEG;
- a colour layout: the mean Y, Cb, Cr of a 4x4 grid (48 numbers). Luma structure alone
  confuses pictures with the same light/dark layout (a bright sky over a dark corner and
  an orange retina with a black corner); colour separates them.
distance = Hamming(hash) + COLOUR_WEIGHT * mean |colour difference| (0-255 scale).

Crops shift and scale what the centre region sees, more than a global hash tolerates, so
each test image is described by VARIANTS signatures of shifted and scaled centre boxes (a
5 x 5 grid of +-5% shifts at 3 scales) and a pretraining image matches when its single
signature is within THRESHOLD of any of them. Test sets are small, the pretraining set is
large: the variants go to the small side. Pictures with almost no structure (a flat
colour) get no near signature and are matched exactly only.

The result is `exclusions/dedup-NAME.parquet` (columns key, reason) in the pretraining
dataset, which the sample stream honours without rewriting shards, plus an HTML report
with each excluded image beside the test image it copies.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import html
import io
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy.fft import dctn
from tqdm import tqdm

from sharding import format as fmt
from sharding import open_dataset
from sharding.index import write_table
from sharding.tar_reader import ShardDamage, iter_samples
from vitscale_common.atomic import atomic_write_text
from vitscale_common.errors import UserError, cli_entry

THUMB = 32  # side of the grey thumbnail the DCT is taken on
DCT_K = 12  # the hash keeps the K x K lowest frequencies minus DC: K*K - 1 bits
HASH_BITS = DCT_K * DCT_K - 1
GRID = 4  # colour layout: GRID x GRID cells x (Y, Cb, Cr)
TRIM = 0.1  # border trimmed from each side before describing
SHIFTS = (-0.05, -0.025, 0.0, 0.025, 0.05)  # test-side centre shifts (fraction of the side)
SCALES = (0.9, 0.95, 1.0)  # test-side centre box scales
VARIANTS = len(SHIFTS) ** 2 * len(SCALES)
COLOUR_WEIGHT = 4.0
THRESHOLD = 32.0  # planted copies score <= ~30, distinct pictures >= ~36 (see the tests)
MIN_STRUCTURE = 1.0  # RMS of the hashed DCT coefficients below which a picture is "flat"
MAX_PIXELS = 100_000_000  # decoded-size limit, checked from the header before decoding
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------- signatures
class ImageError(ValueError):
    pass


def decode(data: bytes) -> Image.Image:
    """RGB image from encoded bytes; the pixel count is checked before decoding."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > MAX_PIXELS:
            raise ImageError(f"{im.size[0]}x{im.size[1]} exceeds the {MAX_PIXELS} pixel limit")
        return im.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"undecodable image: {e}") from None


def pixel_sha256(im: Image.Image) -> str:
    h = hashlib.sha256(f"{im.size[0]}x{im.size[1]}:".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def _centre_box(w: int, h: int, shift_x=0.0, shift_y=0.0, scale=1.0) -> tuple[float, float, float, float]:
    half = (0.5 - TRIM) * scale
    return (
        max(0.0, (0.5 + shift_x - half) * w),
        max(0.0, (0.5 + shift_y - half) * h),
        min(w, (0.5 + shift_x + half) * w),
        min(h, (0.5 + shift_y + half) * h),
    )


def describe(ycbcr: Image.Image, box) -> tuple[np.ndarray, np.ndarray] | None:
    """(hash bits (HASH_BITS,) bool, colour layout (GRID*GRID*3,) float32), None if flat."""
    a = np.asarray(ycbcr.resize((THUMB, THUMB), Image.BOX, box=box), dtype=np.float64)  # (32, 32, 3)
    coeffs = dctn(a[..., 0], norm="ortho")[:DCT_K, :DCT_K].ravel()[1:]
    if np.sqrt(np.mean(coeffs**2)) < MIN_STRUCTURE:
        return None
    cell = THUMB // GRID
    colour = a.reshape(GRID, cell, GRID, cell, 3).mean(axis=(1, 3)).ravel().astype(np.float32)
    return coeffs > np.median(coeffs), colour


@dataclasses.dataclass
class Signatures:
    """Signatures of a set of images; near rows may be several per image (variants)."""

    keys: list[str]  # one per image
    exact: list[str]  # pixel sha256, one per image
    owner: np.ndarray  # (R,) int: image index of each near row
    bits: np.ndarray  # (R, HASH_BITS) bool
    colour: np.ndarray  # (R, GRID*GRID*3) float32
    thumbs: list[bytes]  # small JPEG per image, for the report (empty unless asked)

    @classmethod
    def empty(cls) -> "Signatures":
        return cls(
            [],
            [],
            np.zeros(0, np.int64),
            np.zeros((0, HASH_BITS), bool),
            np.zeros((0, GRID * GRID * 3), np.float32),
            [],
        )

    @classmethod
    def concat(cls, parts: Sequence["Signatures"]) -> "Signatures":
        out = cls.empty()
        for p in parts:
            out.owner = np.concatenate([out.owner, p.owner + len(out.keys)])
            out.keys += p.keys
            out.exact += p.exact
            out.bits = np.concatenate([out.bits, p.bits])
            out.colour = np.concatenate([out.colour, p.colour])
            out.thumbs += p.thumbs
        return out


def thumbnail_jpeg(im: Image.Image, side: int = 128) -> bytes:
    t = im.copy()
    t.thumbnail((side, side))
    buf = io.BytesIO()
    t.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def signatures(
    images: Iterable[tuple[str, bytes]], *, variants: bool, thumbs: bool = False, skipped: list | None = None
) -> Signatures:
    """Signatures of (key, encoded bytes) pairs; undecodable ones go to `skipped` as (key, why)."""
    boxes = [(dx, dy, s) for s in SCALES for dx in SHIFTS for dy in SHIFTS] if variants else [(0.0, 0.0, 1.0)]
    keys, exact, owner, bits, colour, thumb_list = [], [], [], [], [], []
    for key, data in images:
        try:
            im = decode(data)
        except ImageError as e:
            if skipped is not None:
                skipped.append((key, str(e)))
            continue
        index = len(keys)
        keys.append(key)
        exact.append(pixel_sha256(im))
        if thumbs:
            thumb_list.append(thumbnail_jpeg(im))
        ycbcr = im.convert("YCbCr")
        for dx, dy, s in boxes:
            d = describe(ycbcr, _centre_box(*im.size, dx, dy, s))
            if d is not None:
                owner.append(index)
                bits.append(d[0])
                colour.append(d[1])
    return Signatures(
        keys,
        exact,
        np.asarray(owner, np.int64),
        np.asarray(bits, bool).reshape(-1, HASH_BITS),
        np.asarray(colour, np.float32).reshape(-1, GRID * GRID * 3),
        thumb_list,
    )


# --------------------------------------------------------------------------- matching
@dataclasses.dataclass(frozen=True)
class Match:
    key: str  # pretraining sample
    test_index: int  # index into the test signatures
    kind: str  # "exact" | "near"
    distance: float  # 0 for exact


def near_distances(
    query: Signatures, ref: Signatures, cutoff: float = THRESHOLD, block: int = 16384, pairs_per_chunk: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """For each query near row: (smallest distance to any ref row, that row's ref image).

    Only pairs whose Hamming part is within `cutoff` get a distance (distance >= Hamming,
    so nothing within `cutoff` is missed); the others count as inf. Hamming distances come
    from a matrix product of +-1 codes (BLAS), blocked over the ref rows; the colour term
    is computed a bounded number of pairs at a time.
    """
    n = len(query.owner)
    best = np.full(n, np.inf)
    best_owner = np.full(n, -1, np.int64)
    if n == 0 or len(ref.owner) == 0:
        return best, best_owner
    q = query.bits.astype(np.float32) * 2 - 1
    for start in range(0, len(ref.owner), block):
        r = ref.bits[start : start + block].astype(np.float32) * 2 - 1
        hamming = (HASH_BITS - q @ r.T) / 2  # (n, b)
        cand_q, cand_r = np.nonzero(hamming <= cutoff)
        for c in range(0, cand_q.size, pairs_per_chunk):
            qi, ri = cand_q[c : c + pairs_per_chunk], cand_r[c : c + pairs_per_chunk]
            colour = np.abs(query.colour[qi] - ref.colour[start + ri]).mean(axis=1)
            dist = hamming[qi, ri] + COLOUR_WEIGHT * colour
            order = np.lexsort((dist, qi))  # per query row, smallest distance first
            qi, ri, dist = qi[order], ri[order], dist[order]
            first = np.r_[True, qi[1:] != qi[:-1]]
            qi, ri, dist = qi[first], ri[first], dist[first]
            better = dist < best[qi]
            best[qi[better]] = dist[better]
            best_owner[qi[better]] = ref.owner[start + ri[better]]
    return best, best_owner


def find_matches(query: Signatures, ref: Signatures, threshold: float = THRESHOLD) -> list[Match]:
    """Query images that copy a ref image: exact pixels first, else the nearest within threshold."""
    by_sha = {sha: i for i, sha in enumerate(ref.exact)}
    matches = {}
    for i, sha in enumerate(query.exact):
        if sha in by_sha:
            matches[i] = Match(query.keys[i], by_sha[sha], "exact", 0.0)
    dist, owner = near_distances(query, ref)
    for row in np.argsort(dist, kind="stable"):
        i = int(query.owner[row])
        if dist[row] > threshold:
            break
        if i not in matches:
            matches[i] = Match(query.keys[i], int(owner[row]), "near", float(dist[row]))
    return [matches[i] for i in sorted(matches)]


# --------------------------------------------------------------------------- datasets
def split_shards(dataset: Path, split: str) -> list[Path]:
    if not (dataset / fmt.DATASET_JSON).is_file():
        raise UserError(f"{dataset}: not a shard dataset (no {fmt.DATASET_JSON})")
    shards = [Path(s.path) for s in open_dataset(dataset).shards(split)]
    if not shards:
        raise UserError(f"{dataset}: split {split!r} has no shards")
    return shards


def shard_images(shard: Path) -> Iterator[tuple[str, bytes]]:
    with open(shard, "rb") as f:
        try:
            for sample in iter_samples(f):
                data = next((sample.members[e] for e in IMAGE_EXTS if e in sample.members), None)
                if data is not None:
                    yield sample.key, data
        except ShardDamage as e:
            print(f"warning: {shard}: {e}; later samples not checked", file=sys.stderr)


@dataclasses.dataclass
class TestSet:
    name: str  # "DATASET:SPLIT", shown in reasons and the report
    signatures: Signatures


def load_test_set(spec: str) -> TestSet:
    """`DIR` or `DIR:SPLIT` (default split: test) -> signatures with variants and thumbnails."""
    path, _, split = spec.partition(":")
    dataset = Path(path)
    split = split or "test"
    parts = []
    for shard in tqdm(split_shards(dataset, split), desc=f"test set {dataset.name}:{split}", unit="shard"):
        parts.append(signatures(shard_images(shard), variants=True, thumbs=True))
    return TestSet(f"{dataset.name}:{split}", Signatures.concat(parts))


_TEST: Signatures | None = None  # the combined test signatures, shared with pool workers


def _init_worker(test: Signatures) -> None:
    global _TEST
    _TEST = test


def _scan_shard(shard: Path) -> tuple[list[Match], dict[str, bytes], list]:
    skipped: list = []
    sigs = signatures(shard_images(shard), variants=False, skipped=skipped)
    matches = find_matches(sigs, _TEST)
    # thumbnails only of the few matched images, taken from a second read of the shard
    wanted = {m.key for m in matches}
    thumbs = {k: thumbnail_jpeg(decode(d)) for k, d in shard_images(shard) if k in wanted}
    return matches, thumbs, skipped


@dataclasses.dataclass
class DedupResult:
    scanned_shards: int
    matches: list[Match]
    test_names: list[str]  # per test image: its test set's name
    test_keys: list[str]
    thumbs: dict[str, bytes]  # pretraining key -> thumbnail
    test_thumbs: list[bytes]
    skipped: list


def deduplicate(
    pretrain: Path,
    splits: Sequence[str],
    test_sets: Sequence[TestSet],
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
) -> DedupResult:
    """Scan this task's share of the pretraining shards (every num_tasks-th) against the test sets."""
    test = Signatures.concat([t.signatures for t in test_sets])
    names = [t.name for t in test_sets for _ in t.signatures.keys]
    shards = [s for split in splits for s in split_shards(pretrain, split)][task_index::num_tasks]
    matches, thumbs, skipped = [], {}, []
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(test,))
        scanned = pool.map(_scan_shard, shards)
    else:
        _init_worker(test)
        scanned = map(_scan_shard, shards)
    try:
        for m, t, s in tqdm(scanned, total=len(shards), desc="pretraining shards", unit="shard"):
            matches += m
            thumbs |= t
            skipped += s
    finally:
        if pool is not None:
            pool.shutdown()
    return DedupResult(len(shards), matches, names, test.keys, thumbs, test.thumbs, skipped)


# --------------------------------------------------------------------------- outputs
def exclusion_name(name: str, task_index: int, num_tasks: int) -> str:
    return f"dedup-{name}" if num_tasks == 1 else f"dedup-{name}-task{task_index:05d}-of-{num_tasks:05d}"


def remove_other_splits(pretrain: Path, name: str, num_tasks: int) -> None:
    """Drop this list's files left by a run cut into a different number of tasks.

    The stream excludes the union of exclusions/*.parquet, so a stale file from an earlier
    split of the work would go on excluding; files of the current split are left alone
    (other tasks may be writing them).
    """
    ours = re.compile(rf"dedup-{re.escape(name)}(-task\d{{5}}-of-(\d{{5}}))?\.parquet")
    for path in (pretrain / fmt.EXCLUSIONS_DIR).glob("dedup-*.parquet"):
        m = ours.fullmatch(path.name)
        if m and int(m.group(2) or 1) != num_tasks:
            path.unlink()


def write_exclusions(pretrain: Path, stem: str, result: DedupResult) -> Path:
    """`exclusions/STEM.parquet`: the stream reads key and reason; the rest is for people."""
    out = pretrain / fmt.EXCLUSIONS_DIR / f"{stem}.parquet"
    table = pa.table(
        {
            "key": [m.key for m in result.matches],
            "reason": [f"{m.kind}_duplicate_of_test_image" for m in result.matches],
            "duplicate_of": [
                f"{result.test_names[m.test_index]}/{result.test_keys[m.test_index]}" for m in result.matches
            ],
            "distance": [m.distance for m in result.matches],
        },
        schema=pa.schema(
            [("key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string()), ("distance", pa.float64())]
        ),
    )
    write_table(out, table)
    return out


def _img_tag(jpeg: bytes) -> str:
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'


def write_report(path: Path, result: DedupResult, limit: int = 2000) -> None:
    """HTML page: each excluded pretraining image beside the test image it copies."""
    shown = sorted(result.matches, key=lambda m: -m.distance)[:limit]  # least certain first
    rows = "\n".join(
        f"<tr><td>{_img_tag(result.thumbs[m.key])}<br>{html.escape(m.key)}</td>"
        f"<td>{_img_tag(result.test_thumbs[m.test_index])}<br>"
        f"{html.escape(result.test_names[m.test_index])}/{html.escape(result.test_keys[m.test_index])}</td>"
        f"<td>{m.kind}</td><td>{m.distance:.1f}</td></tr>"
        for m in shown
        if m.key in result.thumbs
    )
    exact = sum(m.kind == "exact" for m in result.matches)
    page = f"""<!doctype html><meta charset="utf-8"><title>De-duplication report</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:top;font-size:12px}} img{{max-height:128px}}</style>
<h1>De-duplication report</h1>
<p>{len(result.matches)} pretraining images excluded ({exact} exact, {len(result.matches) - exact} near) after
scanning {result.scanned_shards} shards against {len(result.test_keys)} test images. Near-duplicate distance
threshold {THRESHOLD} (Hamming bits + {COLOUR_WEIGHT} x colour difference). {len(result.skipped)} undecodable
images skipped. Showing {len(shown)}, least certain first.</p>
<table><tr><th>pretraining image</th><th>test image</th><th>kind</th><th>distance</th></tr>
{rows}
</table>
"""
    atomic_write_text(path, page)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrain", type=Path, help="the pretraining shard dataset to clean")
    p.add_argument(
        "--against",
        action="append",
        required=True,
        metavar="DIR[:SPLIT]",
        help="a downstream shard dataset and split (default test); repeat for several",
    )
    p.add_argument("--splits", default="train", help="comma-separated pretraining splits to scan")
    p.add_argument("--name", default="downstream", help="exclusion list name: exclusions/dedup-NAME.parquet")
    p.add_argument("--workers", type=int, default=1, help="processes scanning pretraining shards")
    p.add_argument("--num-tasks", type=int, default=1, help="split the shards over this many jobs (a SLURM array)")
    p.add_argument("--task-index", type=int, default=0, help="this job's share: 0..num-tasks-1")
    p.add_argument("--report", type=Path, help="HTML report path (default: PRETRAIN/reports/dedup-NAME.html)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.task_index < args.num_tasks:
        raise UserError(f"--task-index {args.task_index} is not in 0..{args.num_tasks - 1}")
    test_sets = [load_test_set(spec) for spec in args.against]
    result = deduplicate(
        args.pretrain,
        args.splits.split(","),
        test_sets,
        workers=args.workers,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
    )
    stem = exclusion_name(args.name, args.task_index, args.num_tasks)
    remove_other_splits(args.pretrain, args.name, args.num_tasks)
    out = write_exclusions(args.pretrain, stem, result)
    report = args.report or args.pretrain / "reports" / f"{stem}.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, result)
    exact = sum(m.kind == "exact" for m in result.matches)
    print(
        f"scanned {result.scanned_shards} shards against {len(result.test_keys)} test images: "
        f"excluded {len(result.matches)} ({exact} exact, {len(result.matches) - exact} near), "
        f"{len(result.skipped)} undecodable skipped -> {out}, report {report}"
    )
    return 0


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-prep dedup", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
