#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one run (about 9 minutes on one H100/H200;
# SKIP_MODEL_SPEED=1 leaves out the first part, the figures that change least):
# model speed and bf16 MFU of ViT-B/16 and ViT-H/14 against timm, then the trainer's
# step against a bare loop (fp32 with TF32) for ViT-B/16 without ZeRO (with our clip and with
# DeepSpeed's) and with ZeRO-1, and for ViT-H/14 with ZeRO-1; then ViT-B/16 and ViT-H/14 as
# their recipes train (ZeRO-1 and ZeRO-2, bf16; H/14 with fp32 and with bf16 gradients),
# against a bare bf16-autocast loop.
#
#     bash benchmarks/gpu_suite.sh 2>&1 | tee gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
if [ "${SKIP_MODEL_SPEED:-0}" != 1 ]; then
    python3 benchmarks/model_speed.py --device cuda --bf16 --models vit_b16 --batch 256 --rounds 5 --steps 5 --warmup 3
    python3 benchmarks/model_speed.py --device cuda --bf16 --models vit_h14 --batch 64 --rounds 5 --steps 3 --warmup 2
fi
# 5-step rounds on a GPU: its timings are steady, and a 100 ms step would otherwise also
# carry a Trainer.fit call's start-up each round (comparable with the earlier GPU figures).
for stage in 0 1; do
    python3 benchmarks/trainer_overhead.py --device cuda --model vit_b16 --img 224 --batch 128 --steps 30 --round 5 --stage "$stage"
done
# Stage 0 with DeepSpeed's own per-parameter clip, the one ours replaced.
python3 benchmarks/trainer_overhead.py --device cuda --model vit_b16 --img 224 --batch 128 --steps 30 --round 5 --stage 0 \
    --deepspeed-grad-norm
python3 benchmarks/trainer_overhead.py --device cuda --model vit_h14 --img 224 --batch 32 --steps 20 --round 5 --stage 1
python3 benchmarks/trainer_overhead.py --device cuda --model vit_b16 --img 224 --batch 128 --steps 30 --round 5 --stage 1 --bf16
for grads in fp32 bf16; do
    python3 benchmarks/trainer_overhead.py --device cuda --model vit_h14 --img 224 --batch 32 --steps 20 --round 5 --stage 2 \
        --bf16 --zero grad_dtype="$grads"
done
