#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md, by section, at most 570 s per invocation on one GPU:
#   b16   ViT-B/16 recipe: vit-pretrain's own step (the recipe's DeepSpeed engine, synthetic
#         batches on the device) eager and with `train.compile=blocks`, a bare compiled PyTorch
#         loop of the same model (bf16 autocast, fused AdamW) and timm's ViT in that loop;
#         images/s, MFU against the card's dense bf16 peak, host syncs per steady-state step
#         (about 4 minutes)
#   feed  the loader: benchmarks/loader_speed.py with the GPU decode end to end (images per
#         CPU-second of each path), then the compiled B/16 step fed real shards with
#         data.decode=gpu against the same engine fed synthetic batches, in alternating rounds,
#         with the CPU cores the loader used (about 3 minutes)
#   h14   ViT-H/14 recipe: the four loops of b16 (about 5 minutes)
# All three take longer than one invocation's 570 s: run `b16 feed` and `h14` as two (the
# default runs all three and skips what does not fit). Each run has a time budget (a run gets
# what is left if that is less, and is skipped under 20 s); one that fails or runs out says
# so and the suite goes on. Results: OUT/results.jsonl, OUT/loader.json, OUT/summary.md.
#
#     bash benchmarks/gpu_suite.sh [OUT] [SECTION...]              (default OUT: gpu_suite_out)
#     bash benchmarks/gpu_suite.sh --cpu-smoke [OUT] [SECTION...]  every section, tiny, on the CPU
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
shift || true
SECTIONS=("$@")
if [ ${#SECTIONS[@]} -eq 0 ]; then SECTIONS=(b16 feed h14); fi
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

# b16, ViT-B/16 (ZeRO-1, bf16, fp32 gradients): at most 7 minutes, about 4 expected.
B16=configs/pretrain/vit_b16_in21k.yaml
section_b16() {
    run 60 "$B16" 128 30 5 --loop trainer --compile none
    run 120 "$B16" 128 30 5 --loop trainer --compile blocks
    run 120 "$B16" 128 30 5 --loop bare
    run 120 "$B16" 128 30 5 --loop timm
}

# feed: the loader's paths, then the compiled B/16 step fed shards decoded on the GPU (3 minutes).
# The stream's width and cycle are cut to the benchmark's batch and dataset; 2 readers.
section_feed() {
    local images=4096 runs=3 loader=(--device cuda)
    if [ ${#SMOKE[@]} -gt 0 ]; then images=64; runs=1; loader=(--images 96 --size 32 --batch 8); fi
    echo "== $(date +%T) loader_speed (${images} JPEGs for the fed step; the loader's own benchmark)"
    if ! timeout --kill-after=10 60 "$PYTHON" benchmarks/loader_speed.py --make-shards "$OUT/feed" \
        --images "$images" > /dev/null \
        || ! timeout --kill-after=10 120 "$PYTHON" benchmarks/loader_speed.py --runs "$runs" "${loader[@]}" \
        --json "$OUT/loader.json"; then
        echo "== FAILED: loader_speed"
        FAILED=$((FAILED + 1))
        return
    fi
    local batch=128 width=16
    if [ ${#SMOKE[@]} -gt 0 ]; then batch=2; width=2; fi
    run 180 "$B16" "$batch" 40 5 --loop trainer --compile blocks --round 10 --feed "$OUT/feed/shards" \
        --set data.decode=gpu data.readers=2 data.stream_cycle=2 "data.stream_width=$width"
}

# h14, ViT-H/14 (ZeRO-2, bf16, fp32 gradients): about 5 minutes.
H14=configs/pretrain/vit_h14_in21k.yaml
section_h14() {
    run 90 "$H14" 32 15 3 --loop trainer --compile none
    run 150 "$H14" 32 15 3 --loop trainer --compile blocks
    run 150 "$H14" 32 15 3 --loop bare
    run 150 "$H14" 32 15 3 --loop timm
}

for section in "${SECTIONS[@]}"; do
    case $section in
        b16|feed|h14) "section_$section" ;;
        *) echo "unknown section '$section' (b16, feed, h14)" >&2; exit 2 ;;
    esac
done

"$PYTHON" benchmarks/step_speed.py --summary "$RESULTS" | tee "$OUT/summary.md"
echo "== $(date +%T) done: $(wc -l < "$RESULTS") results, $FAILED failed; $RESULTS"
exit $((FAILED > 0))
