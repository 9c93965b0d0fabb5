"""Typed configs from YAML files and `key=value` overrides (OmegaConf structured configs).

Every stage declares its sections as dataclasses next to the code that uses them; a
stage's top-level schema composes those sections. `load_config` merges, in order: the
schema's defaults, each YAML file (a file may name others to merge first with
`_base_: [relative/path.yaml, ...]`), then the overrides. Unknown keys, wrong types and
missing required values raise `ConfigError` with one line naming the key and file.

This lives in `sharding`, the package every stage already depends on, so that data
preparation and SLURM submission can load configs without importing training code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitscale_common.atomic import atomic_write_text
from vitscale_common.errors import UserError

T = TypeVar("T")
BASE_KEY = "_base_"


class ConfigError(UserError):
    """A config that cannot be used; the message names the key (and file) at fault."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    # OmegaConf messages carry a multi-line "full_key/object_type" trailer; keep line one.
    msg = str(err).splitlines()[0].strip() if str(err) else type(err).__name__
    return f"{key}: {msg}" if key else msg


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML file with its `_base_` files merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `{BASE_KEY}` cycle")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, not a stack
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, read_yaml(path.parent / base, _seen + (path.resolve(),)))
    return OmegaConf.merge(merged, node)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {_describe(e)}") from None


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Build a `schema` dataclass instance from YAML files and overrides, fully validated."""
    cfg = OmegaConf.structured(schema)
    layers = [(str(f), read_yaml(f)) for f in files]
    layers.append(("overrides", parse_overrides(overrides)))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_describe(e)}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (dataclass instance or DictConfig)."""
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, to_yaml(cfg))
