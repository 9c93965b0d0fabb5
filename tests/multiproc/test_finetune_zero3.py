"""Starting weights load into a ZeRO-3 partitioned model, on 2 real ranks (gloo)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_starting_weights_load_into_a_zero3_partitioned_model(torchrun_script):
    p = torchrun_script(HERE / "finetune_zero3_rank.py")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "rank 0: ok" in p.stdout and "rank 1: ok" in p.stdout
