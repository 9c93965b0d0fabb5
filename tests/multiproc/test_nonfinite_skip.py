"""A non-finite gradient skips the whole step, as DeepSpeed's ZeRO optimizers do it, on 2 ranks."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("nonfinite_skip_rank.py")
SET_UPS = ("stage1-fp32", "stage2-fp32", "stage3-fp32", "stage1-bf16", "stage2-bf16")


@pytest.fixture(scope="module")
def reports(torchrun_ranks, tmp_path_factory):
    return torchrun_ranks(SCRIPT, str(tmp_path_factory.mktemp("nonfinite")))


@pytest.mark.parametrize("set_up", SET_UPS)
def test_nan_in_micro_batch_2_of_4_skips_the_window_on_every_rank(reports, set_up):
    for rank, report in enumerate(reports):
        got = report[set_up]
        assert got["error"] is None, got
        # Weights, Adam's moments and step count, the schedule: as before the window.
        assert got["unchanged_across_skip"], (rank, got)
        assert got["adam_steps"] == [[1.0], [1.0], [2.0]], (rank, got)
        # Every window starts on an accumulation boundary, and the next one trains bitwise as
        # it would had the poisoned batch never been seen.
        assert got["boundary"] == [0, 0, 0], (rank, got)
        assert got["as_if_never_seen"], (rank, got)
        assert got["skips"] == [1, 1], (rank, got)  # ours and the engine's, counted once
    assert reports[0][set_up]["logged"] == [[1, 0], [2, 1]]  # step 2's log line reports the skip


def test_the_first_skip_past_the_limit_stops_every_rank(reports):
    for report in reports:
        assert report["no_skips_allowed"].startswith("step 2: gradient is not finite on some rank"), report
        assert "train.max_nonfinite_skips=0" in report["no_skips_allowed"]


def test_stage_0_stops_at_the_next_log_line_naming_the_step(reports):
    for report in reports:
        assert report["stage0"]["error"].startswith("step 2: loss "), report
        assert "gradient norm nan" in report["stage0"]["error"]
        assert report["stage0"]["skips"] == 0
