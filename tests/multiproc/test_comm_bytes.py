"""The bytes every collective moves in a step, counted over 2 ranks, equal the arithmetic that
docs/PRETRAIN.md's communication table is computed with (pretrain/zero/comm_bytes.py)."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("comm_bytes_rank.py")


@pytest.fixture(scope="module")
def reports(torchrun_ranks):
    return torchrun_ranks(SCRIPT)


def test_counted_bytes_equal_the_arithmetic_at_every_stage(reports):
    for report in reports:
        assert len(report) == 14
        for set_up, got in report.items():
            assert got["counted"] == got["arithmetic"], (set_up, got)
            assert got["counted"], set_up  # something was counted: the wrapping reached DeepSpeed's calls
