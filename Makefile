# Two commands do everything on a fresh machine: `make train` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-install
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.PHONY: install train test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch + torchvision are resolved together: pip picks the pair that imports on this machine
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/python -m jedi_train.cli.demo $(ARGS)

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench $(ARGS)

lint: install
	$(BIN)/ruff check jedi_train data_pipelines tests bench launch

clean:
	rm -rf outputs multirun wandb .pytest_cache
