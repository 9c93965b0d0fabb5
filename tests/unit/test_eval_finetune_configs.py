"""The downstream fine-tune recipes load through the fine-tune schema and state the paper's recipe."""

from pathlib import Path

import pytest

from pretrain.finetune.stage import load_finetune_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


@pytest.mark.parametrize(
    "name,classes,steps,eval_split",
    [
        ("imagenet1k_384", 1000, 20000, "val"),
        ("pets_384", 37, 500, "test"),
        ("flowers_384", 102, 500, "test"),
    ],
)
def test_downstream_recipe(name, classes, steps, eval_split):
    cfg = load_finetune_config([CONFIGS / f"{name}.yaml"], ["init.weights=runs/x", "data.path=shards/x"])
    assert (cfg.model.img_size, cfg.model.num_classes, cfg.model.representation_size) == (384, classes, None)
    assert cfg.model.grid_size == (24, 24)
    t, o = cfg.train, cfg.train.optim
    assert (t.steps, t.batch_size, t.loss, t.clip_grad) == (steps, 512, "softmax", 1.0)
    assert (o.name, o.momentum, o.weight_decay, o.schedule) == ("sgd", 0.9, 0.0, "cosine")
    assert o.warmup_steps < steps
    assert cfg.init.reset_head and cfg.init.drop_representation
    assert cfg.data.eval_split == eval_split and cfg.data.train_split == "train"
