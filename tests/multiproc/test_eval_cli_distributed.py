"""vit-eval under torchrun on 2 ranks writes the same results as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pretrain import weights
from pretrain.evaluate import run as vit_eval
from pretrain.model import create_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "data"))
sys.path.insert(0, str(HERE.parent / "unit"))
import test_eval_downstream as downstream  # noqa: E402  (fake ImageNet release -> shards)

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    (tmp_path / "release").mkdir()
    downstream._fake_imagenet(tmp_path / "release")
    ds = downstream._convert("imagenet1k", tmp_path / "release", tmp_path / "in1k")
    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=64, num_classes=4)
    save_file(
        {k: v.contiguous() for k, v in weights.to_timm(model.state_dict()).items()}, str(tmp_path / "w.safetensors")
    )
    (tmp_path / "real.json").write_text(json.dumps([[n % 4] if n % 2 else [] for n in range(1, 13)]))

    args = [
        str(tmp_path / "w.safetensors"),
        "--model",
        "vit_ti16",
        "--data",
        str(ds.path),
        "--split",
        "val",
        "--resolution",
        "64",
        "--fewshot",
        "1,5",
        "--linear-probe",
        "--real",
        str(tmp_path / "real.json"),
        "--workers",
        "0",
        "--batch-size",
        "4",
    ]
    assert vit_eval.main(args + ["--out", str(tmp_path / "ranks1")]) == 0
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "pretrain.evaluate"]
    proc = subprocess.run(
        torchrun + args + ["--out", str(tmp_path / "ranks2")],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for ranks in (1, 2):
        doc = json.loads((tmp_path / f"ranks{ranks}" / f"{ds.name}-val-64px.json").read_text())
        assert doc["ranks"] == ranks
        results[ranks] = doc["results"]
    assert results[1]["samples"] == 12 and results[1]["real_samples"] == 6
    assert results[2] == pytest.approx(results[1], abs=1e-9)
