"""Image signatures that find a test image's copies in a pretraining set, and their matching.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

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
