"""The built wheel holds every module and every file the commands need.

The wheel is built from the checkout and installed into a fresh virtual environment (its
dependencies come from this one's site-packages, without the editable install's hook), then
every module of the tree is imported from it, every console script and every documented
`python -m` path answers `--help`, and `vit-demo` finds its configs there. An editable
install hides a package the wheel lacks; this does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["vitscale_common", "sharding", "data_prep", "pretrain", "slurm"]
CONSOLE_SCRIPTS = [
    "vit-prep",
    "vit-pretrain",
    "vit-finetune",
    "vit-export",
    "vit-eval",
    "vit-inspect",
    "vit-demo",
    "vit-submit",
]
# The `python -m` paths in README, docs, configs' headers and the sbatch template.
MODULE_PATHS = [
    "pretrain.train",
    "pretrain.finetune",
    "pretrain.evaluate",
    "pretrain.demo",
    "data_prep.cli",
    "data_prep.dedup",
    "sharding.plan_report",
]


def source_modules() -> list[str]:
    mods = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.append(".".join(parts))
    return mods


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp / "dist").glob("vitscale-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Dependencies from this environment: a path line in a .pth file adds the directory, but
    # .pth files inside it (the editable install's import hook among them) are not run.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run_in(venv: Path, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_imports_every_module_from_itself(wheel_env, tmp_path):
    mods = source_modules()
    assert len(mods) > 60 and "data_prep.sources.in21k" in mods and "pretrain.zero.engine" in mods
    code = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "for m in mods:\n"
        "    f = importlib.import_module(m).__file__\n"
        "    assert f.startswith(sys.prefix), (m, f)\n"
        "print(len(mods))\n"
    )
    p = run_in(wheel_env, [str(wheel_env / "bin" / "python"), "-c", code], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [str(len(mods))]


def test_wheel_ships_configs_and_templates(wheel_env, tmp_path):
    code = (
        "import sys\n"
        "from pretrain.demo import CONFIGS\n"
        "import slurm.render as r; from pathlib import Path\n"
        "assert str(CONFIGS).startswith(sys.prefix), CONFIGS\n"
        "for f in ['pretrain/demo.yaml', 'finetune/demo.yaml', 'prep/digits.yaml', 'model/vit_h14.yaml']:\n"
        "    assert (CONFIGS / f).is_file(), f\n"
        "assert (Path(r.__file__).parent / 'templates' / 'job.sbatch').is_file()\n"
        "assert (Path(r.__file__).parent / 'cluster' / 'slurm.conf.in').is_file()\n"
    )
    p = run_in(wheel_env, [str(wheel_env / "bin" / "python"), "-c", code], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]


def test_every_console_script_and_module_path_answers_help(wheel_env, tmp_path):
    cmds = [[str(wheel_env / "bin" / s), "--help"] for s in CONSOLE_SCRIPTS]
    cmds += [[str(wheel_env / "bin" / "python"), "-m", m, "--help"] for m in MODULE_PATHS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: run_in(wheel_env, c, tmp_path), cmds))
    for cmd, p in zip(cmds, results):
        name = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}"
        assert p.stdout.lstrip().startswith("usage:"), f"{name}: {p.stdout[:300]}"
