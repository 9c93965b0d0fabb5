"""Fine-tuning at a higher resolution: `vit-finetune` (`python -m pretrain.finetune`)."""
