"""Keep freed host memory in the process for reuse, instead of handing it back to the OS.

PyTorch's CPU tensors come from malloc, and glibc serves every block above its mmap
threshold (a few MiB, 32 MiB at most) with a fresh mapping that free() unmaps again.
DeepSpeed's ZeRO-1/2 optimizer frees and re-allocates model-sized buffers every step (the
gradient bucket, the flat gradient partition), so on a CPU rank the kernel maps and zeroes
those pages anew each step, a large share of a CPU step's time (docs/PERFORMANCE.md has
the page faults and step ratios, from `benchmarks/trainer_overhead.py`). With mmap and
trimming off, glibc keeps freed blocks and hands them out again. The price is memory: the
heap settles above the peak of live memory (a small allocation can take the start of a
freed block, so the next big one extends the heap) and is kept, flat from the second step
on (`benchmarks/zero3_memory.py`).

GPU ranks are left alone: their per-step buffers live in CUDA's caching allocator already.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest free heap top glibc keeps rather than returning it.
_KEEP_TOP_BYTES = 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Make this process's malloc reuse freed large blocks; False where malloc is not glibc's.

    Affects allocations made from now on, in this process and in children it forks later.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt (macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt is a stub that returns 0: reported as not applied.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP_BYTES) == 1
