"""Public names kept for `pretrain.weights`: the weight formats of other codebases and checked loading.

The code is in pretrain/model/: timm_format.py, npz_format.py and state_dict.py.
"""

from pretrain.model.npz_format import load_npz, save_npz
from pretrain.model.state_dict import load_weights
from pretrain.model.timm_format import from_timm, to_timm

__all__ = ["from_timm", "load_npz", "load_weights", "save_npz", "to_timm"]
