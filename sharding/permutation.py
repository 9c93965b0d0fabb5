"""A seeded bijection on [0, n) computed index by index: the global shuffle of a listing.

Shuffling a 300M-image listing with `np.random.permutation` needs the whole permutation
in every task's memory. Instead, a balanced Feistel network permutes [0, 4^h) for the
smallest 4^h >= n, and cycle-walking (re-applying it until the value falls below n) turns
that into a permutation of [0, n). Any task evaluates only the positions it owns, in
memory proportional to its own share. Pure uint64 arithmetic, so the result is the same
on every machine.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(r: np.ndarray, key: np.uint64) -> np.ndarray:
    # The splitmix64 finaliser on arrays: a good avalanche, so a few rounds suffice.
    x = r ^ key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """`perm(positions)` -> the listing indices at those positions of the shuffled order."""

    def __init__(self, n: int, seed: int, rounds: int = 6):
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = int(n)
        self.half_bits = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        state = _splitmix64(int(seed) & _M64)
        self._keys = []
        for _ in range(rounds):
            state = _splitmix64(state)
            self._keys.append(np.uint64(state))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._mask)
        return (left << h) | right

    def __call__(self, positions) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        with np.errstate(over="ignore"):
            out = self._encrypt(pos.astype(np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
