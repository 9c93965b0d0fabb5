"""Host memory reuse: a freed model-sized buffer is handed out again without new page faults."""

import platform
import subprocess
import sys

import pytest

# Allocates, fills and frees a 64 MiB tensor, as DeepSpeed's ZeRO-1/2 does with its
# gradient buffers every step, and prints the minor page faults of the last 8 of 24
# rounds. The heap takes a few rounds to settle: a small allocation can land where the
# freed block was, so glibc extends the heap until freed blocks line up again.
_ROUNDS = """
import resource, sys, torch
from pretrain.runtime.glibc_host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "reuse" else None
for _ in range(16):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_BUFFER = (64 << 20) // 4096


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    applied, count = out.split()
    return applied, int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    _, default = faults("default")
    applied, reused = faults("reuse")
    assert applied == "True"
    # Without it every round maps the buffer afresh; with it, a freed block comes back.
    assert default > 7 * PAGES_PER_BUFFER
    assert reused < PAGES_PER_BUFFER / 10
