"""What a run reports: metrics.jsonl, TensorBoard scalars, and model FLOPs for MFU.

Only rank 0 writes. On resume, lines past the resumed step are dropped first, so after
any number of kills `metrics.jsonl` holds one line per logged step: the run's true curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pretrain.model.flops import forward_flops
from vitscale_common.atomic import atomic_write_text

# Dense bf16 peak FLOP/s by device name fragment (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def vit_forward_flops(model_cfg) -> float:
    """Multiply-adds x 2 of one image's forward pass, counted from the architecture."""
    return forward_flops(model_cfg).total


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a line torn by a kill mid-write
                continue
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]
