"""The small collectives the trainer uses to keep ranks in agreement, over 2 real gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

# Each rank saw different failures (rank 0 only decode errors, rank 1 also an excluded sample);
# rank 1 alone saw a non-finite loss and rank 0 alone was asked to stop.
RANK_PROGRAM = """
import json, os, torch.distributed as dist
from pretrain.runtime import collectives, distributed
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
mine = {"substituted": 3, "decode_error": 3} if rank == 0 else {"substituted": 2, "decode_error": 1, "excluded": 1}
result = {"counters": collectives.sum_counters(mine), "flags": collectives.all_reduce_flags(rank == 1, rank == 0)}
distributed.shutdown()
print(json.dumps(result))
"""


def test_counters_sum_over_ranks_and_flags_agree():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    for out, _ in outputs:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["counters"] == {"substituted": 5, "decode_error": 4, "excluded": 1}
        assert result["flags"] == [1.0, 1.0]
