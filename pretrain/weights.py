"""Public names kept for `pretrain.weights`; the code is in pretrain/model/weight_formats.py."""

from pretrain.model.weight_formats import from_timm, load_npz, load_weights, save_npz, to_timm

__all__ = ["from_timm", "load_npz", "load_weights", "save_npz", "to_timm"]
