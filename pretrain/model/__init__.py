"""The Vision Transformer family, its hybrid ResNet stem, position-embedding resampling and weight formats."""

from pretrain.model.vit import (
    VisionTransformer,
    ViTConfig,
    build_model,
    create_model,
    list_models,
    model_config,
    register_model,
)

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]
