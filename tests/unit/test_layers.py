"""The layer contracts in pyproject.toml hold, and they catch an import that breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ["vitscale_common", "sharding", "data_prep", "pretrain", "slurm"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tree(tmp_path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree):
    p = lint_imports(tree)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in p.stdout, p.stdout[-3000:]


@pytest.mark.parametrize(
    "module, bad_import, contract",
    [
        (
            "pretrain/model/vit.py",
            "from pretrain.train.loop import Trainer",
            "pretrain.model is not allowed to import pretrain.train",
        ),
        ("sharding/stream.py", "import pretrain.data.loaders", "sharding is not allowed to import pretrain"),
        ("vitscale_common/atomic.py", "import sharding.format", "vitscale_common is not allowed to import sharding"),
        ("slurm/render.py", "import pretrain.runtime.signals", "slurm is not allowed to import pretrain"),
        ("data_prep/workdir.py", "import data_prep.convert", "No cycles are allowed in data_prep"),
    ],
)
def test_an_import_against_the_layers_fails(tree, module, bad_import, contract):
    path = tree / module
    path.write_text(path.read_text() + f"\n{bad_import}  # deliberately against the layers\n")
    p = lint_imports(tree)
    assert p.returncode != 0
    assert contract in p.stdout, p.stdout[-3000:]
