"""Model FLOPs utilisation from the GPU suite's results (benchmarks/gpu_suite.sh writes
OUT/results.jsonl, one line per timed loop; benchmarks/step_speed.py documents the fields).

The suite's `mfu` counts 3 x forward FLOPs per image; the planner counts the exact forward
and backward (pretrain.model.flops), so the figure is converted to the planner's count for the
recipe that was timed before it is applied to another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.model.flops import forward_flops, training_flops
from pretrain.plan.hardware import Gpu
from pretrain.train.config import load_pretrain_config
from vitscale_common.errors import UserError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


@dataclass(frozen=True)
class Calibration:
    mfu: float
    source: str  # where the figure comes from, for the report


def calibrate(results: Path | None, gpu: Gpu, compile_mode: str, default_mfu: float) -> Calibration:
    """The MFU of vit-pretrain's own step (`trainer` loop, same `train.compile`) on this GPU kind,
    from the newest matching line of `results`; the stated default without one."""
    if results is None:
        return Calibration(default_mfu, f"assumed (assume.mfu={default_mfu})")
    try:
        rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"--calibration {results}: not a GPU-suite results file ({e})") from None
    loop = f"trainer {compile_mode}"
    matching = [
        r for r in rows
        if r.get("loop") == loop and gpu.match and gpu.match in r.get("device", "") and r.get("mfu")
        and (RECIPES / f"{r.get('recipe')}.yaml").is_file()
    ]  # fmt: skip
    if not matching:
        raise UserError(f"--calibration {results}: no `{loop}` result on a {gpu.match or 'matching'} GPU")
    row = matching[-1]
    model = load_pretrain_config([RECIPES / f"{row['recipe']}.yaml"], ["data.path=unused", "run.dir=unused"]).model
    mfu = row["mfu"] * training_flops(model) / (3 * forward_flops(model).total)
    return Calibration(mfu, f"{row['recipe']} `{loop}` on {row['device']}, batch {row['batch']}: {100 * mfu:.1f}%")
