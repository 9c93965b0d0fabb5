"""Steady-state training steps read nothing of ours on the host, over 2 ranks, stages 0-3.

A host read of a device value (`.item()`, `bool(t)`, `float(t)`: `aten._local_scalar_dense`)
makes the CPU wait for the GPU, so the next step cannot be queued behind this one. What
DeepSpeed itself reads each optimizer step is counted too and listed in docs/PRETRAIN.md.
"""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("host_sync_rank.py")
SET_UPS = ("stage0-fp32", "stage1-fp32", "stage2-fp32", "stage1-bf16", "stage2-bf16", "stage3-bf16")


@pytest.fixture(scope="module")
def reports(torchrun_ranks, tmp_path_factory):
    return torchrun_ranks(SCRIPT, str(tmp_path_factory.mktemp("host_syncs")))


@pytest.mark.parametrize("set_up", SET_UPS)
def test_steady_state_steps_make_no_host_read_of_ours(reports, set_up):
    for rank, report in enumerate(reports):
        reads = report[set_up]
        ours = {where: n for where, n in reads.items() if not where.startswith("deepspeed/")}
        assert ours == {}, (rank, set_up, reads)


def test_deepspeeds_own_reads_are_those_listed(reports):
    # Per set-up, over 3 optimizer steps; docs/PRETRAIN.md ("Host syncs") lists them per step.
    skip = "deepspeed/utils.py:is_invalid_grad_norm <- "
    zero12 = {skip + "stage_1_and_2.py:step": 3, skip + "stage_1_and_2.py:unscale_and_clip_grads": 6}
    listed = {
        "stage0-fp32": {},
        "stage1-fp32": zero12,
        "stage2-fp32": zero12,
        "stage1-bf16": {skip + "bf16_optimizer.py:step": 3,
                        "deepspeed/utils.py:clip_tensors_by_global_norm <- bf16_optimizer.py:step": 3},
        "stage2-bf16": zero12,
        "stage3-bf16": {skip + "stage3.py:step": 3},
    }  # fmt: skip
    for report in reports:
        got = {s: {w: n for w, n in report[s].items() if w.startswith("deepspeed/")} for s in SET_UPS}
        assert got == listed, got
