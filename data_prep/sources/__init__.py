"""Image collection readers; see data_prep/sources/base.py for the interface."""

from __future__ import annotations

import importlib
import pkgutil

from data_prep.sources.base import Listing, Source, SourceConfig

_REGISTRY: dict[str, type[Source]] = {}
_discovered = False


def register_source(name: str):
    """Class decorator: make a Source available as `--source name`."""

    def deco(cls: type[Source]) -> type[Source]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"source {name!r} registered twice")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if not _discovered:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        _discovered = True


def list_sources() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def build_source(cfg: SourceConfig) -> Source:
    from vitscale_common.errors import UserError

    _discover()
    if cfg.kind not in _REGISTRY:
        raise UserError(f"unknown source {cfg.kind!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.kind](cfg)


__all__ = ["Listing", "Source", "SourceConfig", "register_source", "list_sources", "build_source"]
