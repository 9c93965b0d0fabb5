# Set-up and everyday commands. Every target installs what it needs first, so on a fresh
# clone `make demo` and `make test` are the only two commands a new user has to know.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision first, pinned, so nothing else pulls in a different build.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint format system-deps venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,demo]'
	touch $@

# The system tests stand up a real two-node SLURM cluster; as root we install its Debian
# packages here. As another user they must already be installed (the tests fail, not skip).
system-deps:
	@if [ "$$(id -u)" = 0 ]; then bash slurm/cluster/install.sh; \
	else echo "not root: assuming slurmctld, slurmd, slurm-client and munge are installed"; fi

demo: venv
	$(BIN)/vit-demo

# Lint, format and the import layers (docs/ARCHITECTURE.md), checked before any test runs.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pytest exits 5 when it collects no test; that is not a failure of the suite itself.
# One OpenMP thread per process: the multi-process tests run several ranks on few cores,
# where oversubscribed thread pools make small tensor ops orders of magnitude slower.
test: venv system-deps lint
	OMP_NUM_THREADS=1 $(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) demo_out .pytest_cache
