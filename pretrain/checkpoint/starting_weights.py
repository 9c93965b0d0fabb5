"""Starting weights: read a trained ViT from any supported source, then fit it to a model.

Sources (`read_source`):
  * a vitscale run directory: its newest complete checkpoint, consolidated from the ZeRO
    partitions (the Polyak-averaged weights when the run kept them),
  * a vitscale export (`RUN/export/` or its `model.safetensors`, model config in the metadata),
  * a timm state dict (`.safetensors`, or `.pth`/`.pt`/`.bin` read with weights_only=True),
  * an official vision_transformer / big_vision `.npz` (read with allow_pickle=False).
Files from elsewhere never reach pickle; only a run directory's own DeepSpeed checkpoint is
read by DeepSpeed's consolidation (which unpickles files this project wrote).

`fit_to_model` is paper Section 3.2: drop the pretraining head (and the pre-logits layer
when the target has none), keep the new zero-initialised head, and resample the position
embeddings to the target's patch grid. It returns a report of everything it changed, so
the fine-tune log states the source, the resolution and grid change and which keys were
re-initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pretrain.model import ViTConfig
from vitscale_common.errors import UserError

HEAD_PREFIXES = ("head.",)
REPRESENTATION_PREFIXES = ("pre_logits.",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class Source:
    """Weights in our key layout, and what is known about where they came from."""

    path: Path
    kind: str  # run | export | timm | npz
    state: dict[str, torch.Tensor]
    model: ViTConfig | None = None  # the architecture they were trained as, when the source records it
    run_dir: Path | None = None  # the run that produced them, when known (its config and results)

    @property
    def representation_size(self) -> int | None:
        w = self.state.get("pre_logits.weight")
        return int(w.shape[0]) if w is not None else None

    @property
    def num_classes(self) -> int:
        w = self.state.get("head.weight")
        return int(w.shape[0]) if w is not None else 0


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensor mapping; many .pth files nest it under 'model' or 'state_dict'."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return obj


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # corrupt or not safetensors: name the file, not a stack
            raise UserError(f"{path}: cannot read safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read as a weights-only torch file: {str(e).splitlines()[0]}") from None
    return _unwrap(obj, path)


def _vit_config(fields: dict) -> ViTConfig:
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    return ViTConfig(**{k: v for k, v in fields.items() if k in known})


def _is_export(path: Path) -> bool:
    """Whether a .safetensors file was written by vit-export (it carries the model config)."""
    from safetensors import safe_open

    from pretrain.checkpoint.export import CONFIG_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors: {e}") from None
    return CONFIG_KEY in meta


def read_run(run_dir: Path) -> Source:
    """The newest complete checkpoint of a run, consolidated; its EMA weights when it kept them."""
    from pretrain.checkpoint import export
    from pretrain.checkpoint.checkpointer import Checkpointer

    folder = export.find_checkpoint(run_dir, None)
    saved = Checkpointer.read_state(folder)
    ema = "ema" in saved
    state = export.consolidated_state_dict(folder, ema=ema)
    kind = "run (EMA weights)" if ema else "run"
    return Source(folder, kind, state, _vit_config(saved["config"]["model"]), run_dir)


def read_source(path: str | Path) -> Source:
    """Read starting weights from a run directory, an export, a timm state dict or an .npz."""
    from pretrain.checkpoint import export
    from pretrain.model.npz_format import load_npz
    from pretrain.model.timm_format import from_timm

    path = Path(path)
    if not path.exists():
        raise UserError(f"init.weights: {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir():
        return read_run(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.is_dir():
        raise UserError(f"{path}: neither a run directory (checkpoints/) nor an export (model.safetensors)")
    if path.suffix == ".safetensors" and _is_export(path):
        state, model_cfg = export.load_export(path)
        run_dir = path.parent.parent if path.parent.name == "export" else None
        return Source(path, "export", state, _vit_config(model_cfg), run_dir)
    if path.suffix == ".npz":
        return Source(path, "npz", load_npz(path))
    if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
        return Source(path, "timm", from_timm(_read_tensor_file(path)))
    raise UserError(
        f"{path}: unknown weights format (expected a run or export directory, "
        f".safetensors, {'/'.join(TORCH_SUFFIXES)} or .npz)"
    )


@dataclass
class InitReport:
    """What `fit_to_model` did, for the log and the results table."""

    source: str
    kind: str
    resolution: tuple[tuple[int, int] | None, tuple[int, int]]  # (source, target) image size
    grid: tuple[tuple[int, int] | None, tuple[int, int]]  # (source, target) patch grid
    posemb: str  # 'kept' | 'resampled (<method>)'
    dropped: list[str] = field(default_factory=list)  # source keys not used
    reinitialised: list[str] = field(default_factory=list)  # target keys left at their fresh init

    def lines(self) -> list[str]:
        res_src, res_dst = self.resolution
        grid_src, grid_dst = self.grid
        fmt = lambda hw: "?" if hw is None else f"{hw[0]}x{hw[1]}"
        return [
            f"init: {self.kind} weights from {self.source}",
            f"init: resolution {fmt(res_src)} -> {fmt(res_dst)}, patch grid {fmt(grid_src)} -> {fmt(grid_dst)}, "
            f"position embedding {self.posemb}",
            f"init: dropped {', '.join(self.dropped) or 'nothing'}",
            f"init: re-initialised {', '.join(self.reinitialised) or 'nothing'}",
        ]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _group(keys: list[str]) -> list[str]:
    """'head.weight', 'head.bias' -> 'head.*' (readable logs)."""
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(k.rsplit(".", 1)[0], []).append(k)
    return [f"{mod}.*" if len(ks) > 1 else ks[0] for mod, ks in out.items()]


def _source_grid(source: Source, rows: int, cfg: ViTConfig, given: tuple[int, int] | None) -> tuple[int, int] | None:
    """The patch grid of the source's pos-emb: recorded by the source, else given, else square."""
    recorded = tuple(source.model.grid_size) if source.model else None
    if recorded and given and tuple(given) != recorded:
        raise UserError(
            f"init.source_grid: {given[0]}x{given[1]}, but {source.path} records a "
            f"{recorded[0]}x{recorded[1]} patch grid; leave init.source_grid unset"
        )
    if recorded:
        return recorded
    if given:
        h, w = (int(n) for n in given)
        if rows not in (h * w, h * w + cfg.num_prefix_tokens):
            raise UserError(
                f"init.source_grid: {h}x{w} does not hold the {rows} rows of {source.path}'s position embedding"
            )
        return (h, w)
    grid = _grid_of(rows, cfg)
    h, w = cfg.grid_size
    if grid is None and rows not in (h * w, h * w + cfg.num_prefix_tokens):
        raise UserError(
            f"{source.path}: its position embedding has {rows} rows, not a square patch grid, and the file "
            "records no grid; give it (vit-finetune: init.source_grid=[H,W])"
        )
    return grid


def _grid_of(rows: int, cfg: ViTConfig) -> tuple[int, int] | None:
    """The patch grid of a pos-emb with `rows` rows (with or without a class-token row)."""
    from pretrain.model.posemb import infer_grid_or_none

    return infer_grid_or_none(rows) or (
        infer_grid_or_none(rows - cfg.num_prefix_tokens) if cfg.num_prefix_tokens else None
    )


def fit_to_model(
    source: Source,
    model: nn.Module,
    *,
    reset_head: bool = True,
    posemb_method: str = "bicubic",
    source_grid: tuple[int, int] | None = None,
) -> InitReport:
    """Load `source` into `model` (built for the target task and resolution), in place.

    The head is taken from the source only when `reset_head` is False (then its shape must
    match); the source's pre-logits layer is used when the model has one, dropped when not.
    Position embeddings are resampled to the model's grid when it differs
    (`pretrain.model.state_dict.load_weights`, which names every key that does not fit), from
    the source's patch grid: the one its config records (run directories, exports), else
    `source_grid` (for timm and npz files, which record none), else the square one.
    """
    from pretrain.model.state_dict import load_weights

    cfg: ViTConfig = model.cfg
    state = dict(source.state)
    dropped = [k for k in state if k.startswith(HEAD_PREFIXES)] if reset_head else []
    if model.pre_logits is None:
        dropped += [k for k in state if k.startswith(REPRESENTATION_PREFIXES)]
    for k in dropped:
        del state[k]

    grid_dst = tuple(cfg.grid_size)
    grid_src = None
    if "pos_embed" in state:
        grid_src = _source_grid(source, state["pos_embed"].shape[1], cfg, source_grid)
    with _gathered(model):
        load_weights(
            model,
            state,
            posemb_method=posemb_method,
            skip_prefixes=HEAD_PREFIXES if reset_head else (),
            source=str(source.path),
            source_grid=grid_src,
        )
    res_src = (
        source.model.img_hw
        if source.model
        else (None if grid_src is None else (grid_src[0] * cfg.patch_size, grid_src[1] * cfg.patch_size))
    )
    posemb = "kept" if grid_src in (None, grid_dst) else f"resampled ({posemb_method})"
    reinit = [k for k in model.state_dict() if k not in state]
    return InitReport(
        str(source.path),
        source.kind,
        (res_src, cfg.img_hw),
        (grid_src, grid_dst),
        posemb,
        _group(dropped),
        _group(reinit),
    )


def _gathered(model: nn.Module):
    """ZeRO-3 partitions parameters as the model is built; whole tensors exist only inside
    GatheredParameters, and what rank 0 writes there is what every rank keeps."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
