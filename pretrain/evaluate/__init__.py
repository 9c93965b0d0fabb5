"""Evaluation: top-1, mAP, few-shot and linear probes, during training and as `vit-eval` (`python -m pretrain.evaluate`)."""
