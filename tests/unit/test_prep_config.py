"""vit-prep's config: recipes, flags over recipes, key=value over flags, clear errors."""

import pytest

from data_prep.cli import _parser, convert_config
from data_prep.config import PrepConfig, parse_splits, resolve_tasks
from vitscale_common.config_loader import ConfigError
from vitscale_common.errors import UserError


def _cfg(*argv):
    return convert_config(_parser().parse_args(["convert", *argv]))


def test_flags_override_the_recipe_and_key_values_override_flags():
    cfg = _cfg(
        "--config",
        "configs/prep/imagenet21k.yaml",
        "--input",
        "/data/fall 11:x.tar",
        "--max-side",
        "384",
        "--no-dedup",
        "--workers",
        "4",
        "workers=6",
        "--output",
        "o",
    )
    assert cfg.source.kind == "in21k" and cfg.source.input == "/data/fall 11:x.tar"
    assert cfg.policy.max_side == 384 and cfg.policy.min_side == 32  # the rest of the recipe stays
    assert cfg.dedup is False and cfg.workers == 6 and cfg.samples_per_shard == 10000


def test_unknown_keys_and_bad_types_name_the_key():
    with pytest.raises(ConfigError, match="policy.qualty"):
        _cfg("policy.qualty=3")
    with pytest.raises(ConfigError, match="seed"):
        _cfg("seed=abc")


def test_splits_and_tasks():
    assert parse_splits("train=0.9, val=0.1") == {"train": 0.9, "val": 0.1}
    with pytest.raises(UserError, match="name=fraction"):
        parse_splits("train")
    assert resolve_tasks(PrepConfig(num_tasks=4, task_index=3)) == (3, 4)
    with pytest.raises(UserError, match="outside"):
        resolve_tasks(PrepConfig(num_tasks=4, task_index=4))
