#!/usr/bin/env bash
# The extra CI job: the multi-process tests on the newest DeepSpeed release on PyPI.
# Nothing to do while it is the installed (pinned) one. Otherwise it is installed into the
# CI environment after the main run and the tests run again. A failure fails CI only when
# pyproject.toml's pin admits that release (users would get it); outside the pin the result
# says whether the pin can widen to it.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
newest=$($BIN/pip index versions deepspeed 2>/dev/null | sed -n '1s/^deepspeed (\(.*\))$/\1/p')
installed=$($BIN/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
if [ -z "$newest" ]; then
    echo "deepspeed-newest: could not ask PyPI for DeepSpeed's releases; skipped"
    exit 0
fi
if [ "$newest" = "$installed" ]; then
    echo "deepspeed-newest: the newest release, $newest, is the one the main run tested"
    exit 0
fi
admitted=$($BIN/python - "$newest" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pin = next(Requirement(d) for d in deps if Requirement(d).name == "deepspeed")
print("yes" if pin.specifier.contains(sys.argv[1]) else f"no ({pin})")
PY
)
echo "deepspeed-newest: installing DeepSpeed $newest (main run: $installed; admitted by the pin: $admitted)"
$BIN/pip install --quiet "deepspeed==$newest" || { echo "deepspeed-newest: install failed"; [ "$admitted" != yes ]; exit; }
OMP_NUM_THREADS=1 $BIN/pytest -q tests/multiproc -p no:cacheprovider
rc=$?
if [ $rc -eq 0 ]; then
    echo "deepspeed-newest: the multi-process tests pass on DeepSpeed $newest"
elif [ "$admitted" = yes ]; then
    echo "deepspeed-newest: FAILED on DeepSpeed $newest, which the pin admits: narrow the pin or fix"
    exit $rc
else
    echo "deepspeed-newest: fail on DeepSpeed $newest (outside the pin; it stays as it is)"
fi
exit 0
