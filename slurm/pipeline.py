"""Pipeline configs: the stage configs to run in order, each job waiting for the previous (afterok).

    # configs/pipeline/demo.yaml
    vars: {work: runs/pipeline-demo}
    stages:
      - {stage: prep, configs: [../prep/digits.yaml], overrides: ["output=${vars.work}/data"]}
      - {stage: pretrain, configs: [../pretrain/demo.yaml], overrides: ["data.path=${vars.work}/data"]}

Stage config paths are relative to the pipeline file; `${vars.X}` ties the stages' paths
together (the data one stage writes is the data the next reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from omegaconf import MISSING

from vitscale_common.config_loader import ConfigError, load_config

STAGES = ("prep", "pretrain", "finetune")


@dataclass
class PipelineStage:
    stage: str = MISSING  # prep | pretrain | finetune
    configs: List[str] = field(default_factory=list)  # the stage's config files, merged in order; relative to this file
    overrides: List[str] = field(default_factory=list)  # key=value overrides for that stage


@dataclass
class PipelineConfig:
    vars: Dict[str, str] = field(default_factory=dict)  # values the stages' overrides interpolate
    stages: List[PipelineStage] = field(default_factory=list)  # run in order, each after the previous


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> list[tuple[str, list[Path], list[str]]]:
    """(stage, config paths, overrides) for each stage, validated."""
    cfg = load_config(PipelineConfig, [path], overrides)
    if not cfg.stages:
        raise ConfigError(f"{path}: `stages` is empty")
    out = []
    for i, st in enumerate(cfg.stages):
        if st.stage not in STAGES:
            raise ConfigError(f"{path}: stages[{i}].stage: must be one of {', '.join(STAGES)}, got {st.stage!r}")
        configs = [Path(path).parent / c for c in st.configs]
        for c in configs:
            if not c.is_file():
                raise ConfigError(f"{path}: stages[{i}].configs: {c} not found")
        out.append((st.stage, configs, list(st.overrides)))
    return out
