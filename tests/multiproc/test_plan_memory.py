"""vit-plan's model states equal, byte for byte, the live tensors of a real DeepSpeed engine on
2 CPU ranks (ViT-S/16, 2 blocks, 32 px): ZeRO 1, 2 and 3, fp32 and bf16 with fp32 gradients
(pretrain/plan/model_states.py)."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("plan_memory_rank.py")


@pytest.fixture(scope="module")
def reports(torchrun_ranks):
    return torchrun_ranks(SCRIPT)


def test_parameters_master_weights_and_adam_moments_are_exact(reports):
    for rank, report in enumerate(reports):
        assert len(report) == 6
        for set_up, got in report.items():
            predicted = got["predicted"]
            for measured in (got["after_backward"], got["after_step"]):
                assert measured["parameters"] == predicted["parameters"], (rank, set_up, got)
                assert measured["master"] == predicted["fp32 master weights"], (rank, set_up, got)
                assert measured["optimizer"] == predicted["Adam moments"], (rank, set_up, got)


def test_gradients_and_buckets_are_exact(reports):
    """After backward the rest is the gradients (and ZeRO-3's reduce bucket); after the step only
    what DeepSpeed keeps between steps: ZeRO-1's bf16 optimizer its flat fp32 gradients, ZeRO-3
    its gradient partition and bucket. The ZeRO-1/2 buckets live only inside backward."""
    for rank, report in enumerate(reports):
        for set_up, got in report.items():
            predicted = got["predicted"]
            stage3 = set_up.startswith("stage3")
            buckets = predicted["reduce buckets"] if stage3 else 0
            assert got["after_backward"]["rest"] == predicted["gradients"] + buckets, (rank, set_up, got)
            kept = stage3 or set_up == "stage1-bf16"
            assert got["after_step"]["rest"] == (predicted["gradients"] + buckets if kept else 0), (rank, set_up, got)
