"""The Vision Transformer family, its hybrid ResNet stem, position-embedding resampling and weight formats."""

from pretrain.model.registry import build_model, create_model, list_models, model_config, register_model
from pretrain.model.vit import VisionTransformer, ViTConfig

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]
