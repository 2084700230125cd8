# Two commands do everything on a fresh machine: `make train` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-install
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.PHONY: install train proof eval app test bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch + torchvision are resolved together: pip picks the pair that imports on this machine
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/python -m jedi_train.cli.demo $(ARGS)

# the longer run behind the README's proof table (not in CI): ~1 h on 2 cores, BUDGET=HH:MM:SS to change it
BUDGET ?= 00:00:50:00
proof: install
	$(BIN)/python -m jedi_train.cli.demo --proof trainer.max_time=$(BUDGET) $(ARGS)

# jedi-eval procedural on the newest `make train` run's pipeline (RUN=runs/... for another)
RUN ?= $(lastword $(sort $(wildcard runs/demo-*)))
eval: install
	@test -n "$(RUN)" || { echo "no runs/demo-* yet: run make train first (or make eval RUN=DIR)"; exit 2; }
	$(BIN)/python -m jedi_train.cli.eval procedural $(RUN)/pipeline --out $(RUN)/eval-full $(ARGS)

# jedi-app (the web demo) on the newest `make train` run's pipeline: http://127.0.0.1:7860 (RUN=runs/... for another)
app: install
	@test -n "$(RUN)" || { echo "no runs/demo-* yet: run make train first (or make app RUN=DIR)"; exit 2; }
	$(BIN)/python -c "import gradio" 2>/dev/null || $(BIN)/pip install -q -e '.[app]'
	$(BIN)/python -m jedi_train.cli.app $(RUN)/pipeline $(ARGS)

# two workers, one test file each (module fixtures stay in one process): the suite is mostly waiting on
# subprocesses and imports, so 2 cores finish it in ~2/3 of the serial time; TEST_WORKERS=0 runs serially
# the jedi-* console scripts run in processes forked from one per-worker process that imported the CLIs
# once (tests/helpers/zygote.py); JEDI_TEST_ZYGOTE=0 makes them plain subprocesses again
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench $(ARGS)

# on a lent GPU, first: every CUDA figure the project needs in one command (<= 8 min on one H100; bench/gpu.py)
gpu-check: install
	$(BIN)/python -m bench.gpu --out gpu-check $(ARGS)

lint: install
	$(BIN)/ruff check jedi_train data_pipelines jedi_common tests bench launch

clean:
	rm -rf outputs multirun wandb .pytest_cache
