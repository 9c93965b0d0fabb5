#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one command, about 10 minutes on one H100:
# for the ViT-B/16 and ViT-H/14 pretraining recipes, vit-pretrain's own step (the recipe's
# DeepSpeed engine, synthetic batches on the device) eager and with `train.compile=blocks`,
# a bare compiled PyTorch loop of the same model (bf16 autocast, fused AdamW) and timm's ViT
# in that loop; images/s, MFU against the card's dense bf16 peak, and the trainer's host
# syncs per steady-state step. Each run has a time budget, and the whole suite 570 s (a run
# gets what is left if that is less, and is skipped under 20 s); one that fails or runs out
# says so and the suite goes on. Results: OUT/results.jsonl, the table in OUT/summary.md.
#
#     bash benchmarks/gpu_suite.sh [OUT]                 (default OUT: gpu_suite_out)
#     bash benchmarks/gpu_suite.sh --cpu-smoke [OUT]     every section, 2 steps, tiny, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
PYTHON=${PYTHON:-python3}

SMOKE=()
if [ "${1:-}" = --cpu-smoke ]; then
    SMOKE=(--smoke --device cpu --steps 2 --warmup 1 --batch 2)
    shift
fi
OUT=${1:-gpu_suite_out}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
FAILED=0
SUITE_S=570
START=$SECONDS

if [ ${#SMOKE[@]} -eq 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

# run BUDGET_S RECIPE BATCH STEPS WARMUP LOOP-ARGS...: one loop in a process of its own.
run() {
    local budget=$1 recipe=$2 batch=$3 steps=$4 warmup=$5
    shift 5
    local left=$((SUITE_S - (SECONDS - START)))
    if [ ${#SMOKE[@]} -gt 0 ]; then budget=300; left=300; fi
    if [ "$left" -lt 20 ]; then
        echo "== SKIPPED (the suite's ${SUITE_S} s are used up): $(basename "$recipe") $*"
        FAILED=$((FAILED + 1))
        return
    fi
    if [ "$left" -lt "$budget" ]; then budget=$left; fi
    echo "== $(date +%T) $(basename "$recipe") $* (batch $batch, budget ${budget} s)${SMOKE:+ smoke: ${SMOKE[*]}}"
    timeout --kill-after=10 "$budget" "$PYTHON" benchmarks/step_speed.py --recipe "$recipe" --out "$RESULTS" \
        --work "$OUT" --batch "$batch" --steps "$steps" --warmup "$warmup" "$@" "${SMOKE[@]}"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "== FAILED ($([ $rc = 124 ] && echo "over its ${budget} s budget" || echo "exit $rc")): $(basename "$recipe") $*"
        FAILED=$((FAILED + 1))
    fi
}

# Section 1, ViT-B/16 (ZeRO-1, bf16, fp32 gradients): at most 7 minutes, about 4 expected.
B16=configs/pretrain/vit_b16_in21k.yaml
run 60 "$B16" 128 30 5 --loop trainer --compile none
run 120 "$B16" 128 30 5 --loop trainer --compile blocks
run 120 "$B16" 128 30 5 --loop bare
run 120 "$B16" 128 30 5 --loop timm

# Section 2, ViT-H/14 (ZeRO-2, bf16, fp32 gradients): what is left of the 570 s, about 5 expected.
H14=configs/pretrain/vit_h14_in21k.yaml
run 90 "$H14" 32 15 3 --loop trainer --compile none
run 150 "$H14" 32 15 3 --loop trainer --compile blocks
run 150 "$H14" 32 15 3 --loop bare
run 150 "$H14" 32 15 3 --loop timm

"$PYTHON" benchmarks/step_speed.py --summary "$RESULTS" | tee "$OUT/summary.md"
echo "== $(date +%T) done: $(wc -l < "$RESULTS") results, $FAILED failed; $RESULTS"
exit $((FAILED > 0))
