"""Pretraining: the config, the step loop, the run log, and the `vit-pretrain` entry (`python -m pretrain.train`)."""
