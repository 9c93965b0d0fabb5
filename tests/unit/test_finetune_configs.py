"""The fine-tune recipes: paper defaults, model/resolution overlays, the demo's consistency with
the demo pretraining, and InitConfig validation."""

from pathlib import Path

import pytest

from pretrain.finetune.stage import freeze_backbone, load_finetune_config
from pretrain.model import create_model
from pretrain.train.config import load_pretrain_config
from vitscale_common.config_loader import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FT = CONFIGS / "finetune"
PATHS = ["init.weights=runs/x", "data.path=shards/x"]


def test_schema_defaults_are_the_papers_recipe():
    cfg = load_finetune_config([], ["train.steps=10"])
    t, o = cfg.train, cfg.train.optim
    assert (t.batch_size, t.clip_grad, t.loss) == (512, 1.0, "softmax")
    assert (o.name, o.momentum, o.weight_decay, o.schedule, o.warmup_steps) == ("sgd", 0.9, 0.0, "cosine", 500)
    assert cfg.init.weights is None and cfg.init.reset_head and cfg.init.drop_representation


@pytest.mark.parametrize("name,classes", [("cifar10_384", 10), ("cifar100_384", 100)])
def test_cifar_recipes(name, classes):
    cfg = load_finetune_config([FT / f"{name}.yaml"], PATHS)
    assert (cfg.model.name, cfg.model.img_size, cfg.model.num_classes) == ("vit_b16", 384, classes)
    assert cfg.model.grid_size == (24, 24) and cfg.model.representation_size is None
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.optim.name, cfg.train.optim.weight_decay) == (
        10000,
        512,
        "sgd",
        0.0,
    )
    assert cfg.data.eval_split == "test"


@pytest.mark.parametrize(
    "overlay,width,grid,ema",
    [
        ("vit_b16_384", 768, (24, 24), 0.0),
        ("vit_l16_512", 1024, (32, 32), 0.9999),
        ("vit_h14_518", 1280, (37, 37), 0.9999),
    ],
)
def test_model_overlays_on_a_task_recipe(overlay, width, grid, ema):
    cfg = load_finetune_config([FT / "cifar10_384.yaml", FT / f"{overlay}.yaml"], PATHS)
    assert cfg.model.width == width and cfg.model.grid_size == grid
    assert cfg.model.num_classes == 10 and cfg.train.steps == 10000  # the task's, untouched
    assert cfg.train.batch_size == 512 and cfg.train.ema_decay == ema
    per_gpu = cfg.train.batch_size // (cfg.slurm.nodes * cfg.slurm.gpus_per_node) // cfg.train.grad_accum
    assert per_gpu * cfg.slurm.nodes * cfg.slurm.gpus_per_node * cfg.train.grad_accum == 512


def test_demo_finetune_continues_the_demo_pretraining():
    pre = load_pretrain_config([CONFIGS / "pretrain" / "demo.yaml"])
    ft = load_finetune_config([FT / "demo.yaml"])
    same = ("name", "patch_size", "width", "depth", "heads", "mlp_dim", "pool", "posemb", "num_classes")
    assert {k: getattr(ft.model, k) for k in same} == {k: getattr(pre.model, k) for k in same}
    assert ft.model.img_size == 2 * pre.model.img_size
    assert ft.init.weights == pre.run.dir and ft.data.path == pre.data.path
    assert ft.train.optim.name == "sgd" and ft.train.optim.weight_decay == 0.0


def test_init_section_errors_name_the_key():
    with pytest.raises(ConfigError, match="init.posemb_method"):
        load_finetune_config([], ["train.steps=1", "init.posemb_method=nearest"])
    with pytest.raises(ConfigError, match="init.linear_probe"):
        load_finetune_config([], ["train.steps=1", "init.linear_probe=true", "init.reset_head=false", "zero.stage=2"])
    with pytest.raises(ConfigError, match="init.linear_probe: needs zero.stage >= 2"):
        load_finetune_config([], ["train.steps=1", "init.linear_probe=true", "zero.stage=1"])
    with pytest.raises(ConfigError, match="init.weight"):
        load_finetune_config([], ["train.steps=1", "init.weight=x"])


def test_linear_probe_trains_only_the_head():
    model = create_model("vit_ti16", img_size=16, patch_size=4, width=32, depth=1, heads=2, mlp_dim=64, num_classes=7)
    assert freeze_backbone(model) == 32 * 7 + 7
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
