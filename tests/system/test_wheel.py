"""The built wheel holds every module and every file the commands need.

The wheel is built from the checkout and installed into a fresh virtual environment (its
dependencies come from this one's site-packages, without the editable install's hook), then
every module of the tree is imported from it, every console script and every documented
`python -m` path answers `--help`, and `vit-demo` finds its configs there. An editable
install hides a package the wheel lacks; this does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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
    "vit-plan",
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
    "pretrain.plan",
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
    # Built from a copy of the files git tracks or would add: a `build/` folder left in the
    # checkout would otherwise hand the wheel files the package list no longer names.
    listing = ["git", "ls-files", "-co", "--exclude-standard"]
    for name in subprocess.run(listing, cwd=REPO, check=True, capture_output=True, text=True).stdout.splitlines():
        if (REPO / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(tmp / "src")],
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


def python_in(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` with the fresh environment's interpreter; it must succeed."""
    p = run_in(venv, [str(venv / "bin" / "python"), "-c", code], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


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
    p = python_in(wheel_env, code, tmp_path)
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
    python_in(wheel_env, code, tmp_path)


def test_every_console_script_and_module_path_answers_help(wheel_env, tmp_path):
    # One process for all of them, so torch and DeepSpeed are imported once: each console
    # script's entry point as the wheel declares it, and each `python -m` path as runpy runs it.
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "from importlib.metadata import entry_points\n"
        f"modules = {MODULE_PATHS!r}\n"
        "scripts = {ep.name: ep for ep in entry_points(group='console_scripts') if ep.name.startswith('vit-')}\n"
        "out = {}\n"
        "def call(name, fn):\n"
        "    buf, code = io.StringIO(), None\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            code = fn()\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    out[name] = [code, buf.getvalue()[:200]]\n"
        "for name, ep in sorted(scripts.items()):\n"
        "    call(name, lambda: ep.load()(['--help']))\n"
        "for m in modules:\n"
        "    sys.argv = [m, '--help']\n"
        "    call('-m ' + m, lambda: runpy.run_module(m, run_name='__main__', alter_sys=True))\n"
        "print(json.dumps(out))\n"
    )
    p = python_in(wheel_env, code, tmp_path)
    results = __import__("json").loads(p.stdout.splitlines()[-1])
    assert sorted(k for k in results if not k.startswith("-m ")) == sorted(CONSOLE_SCRIPTS)
    assert sorted(k[3:] for k in results if k.startswith("-m ")) == sorted(MODULE_PATHS)
    for name, (code, text) in results.items():
        assert code in (0, None) and text.lstrip().startswith("usage:"), f"{name}: exit {code}, {text!r}"
    for script in CONSOLE_SCRIPTS:  # the launchers pip wrote for them
        assert (wheel_env / "bin" / script).is_file(), script
