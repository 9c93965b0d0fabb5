"""Starting weights load into a ZeRO-3 partitioned model, on 2 real ranks (gloo)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_starting_weights_load_into_a_zero3_partitioned_model(torchrun_ranks):
    assert torchrun_ranks(HERE / "finetune_zero3_rank.py") == [{"loaded": True}] * 2
