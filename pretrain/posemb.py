"""Public name kept for `pretrain.posemb.resample_posemb`; the code is in pretrain/model/posemb.py."""

from pretrain.model.posemb import METHODS, infer_grid, infer_grid_or_none, resample_posemb

__all__ = ["METHODS", "infer_grid", "infer_grid_or_none", "resample_posemb"]
