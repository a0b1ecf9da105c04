# Every target that needs Python creates or updates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# Extra arguments for plan/sweep/resume/status: overrides (key=value) and --ray-address.
ARGS ?=
# One lock per config, so overlapping `make resume` ticks on this host never start twice.
LOCK ?= /tmp/gemmascope-$(subst /,_,$(CONFIG)).lock

# The report test opens the HTML in headless Chromium (Debian's package).
CHROMIUM_STAMP := $(VENV)/.chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-slow chaos bench lint harvest train plan sweep resume status clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a range would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gemmascope demo --out $(OUT)

$(CHROMIUM_STAMP): $(STAMP)
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium)
	touch $(CHROMIUM_STAMP)

test: $(STAMP) $(CHROMIUM_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The whole crash matrix: every stage killed at seeded crash points and rerun (about 20 min).
chaos: $(STAMP)
	$(BIN)/python -m pytest tests/test_chaos.py $(PYTEST_ARGS)

RESULTS ?= benchmarks/results
bench: $(STAMP)
	mkdir -p $(RESULTS)
	$(BIN)/gemmascope bench harvest --json > $(RESULTS)/harvest.json
	$(BIN)/gemmascope bench loader --json > $(RESULTS)/loader.json
	$(BIN)/gemmascope bench train-step --d-in 640 --width 4096 --batch 1024 --json > $(RESULTS)/train-step-small.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 256 --json > $(RESULTS)/train-step-16k.json
	$(BIN)/gemmascope bench train-step --d-in 640 --width 4096 --batch 1024 --group 8 --json > $(RESULTS)/train-step-group8.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --l0-fraction 0.01 --steps 2 --json \
		> $(RESULTS)/train-step-sparse.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 65536 --batch 1024 --group 2 --steps 2 --json \
		> $(RESULTS)/train-step-65k-group2.json
	$(BIN)/gemmascope bench summary $(RESULTS) | tee $(RESULTS)/summary.md

lint: $(STAMP)
	$(BIN)/ruff check gemmascope tests

harvest: $(STAMP)
	$(BIN)/gemmascope harvest $(CONFIG)

train: $(STAMP)
	$(BIN)/gemmascope train $(CONFIG) --job $(JOB)

plan: $(STAMP)
	$(BIN)/gemmascope plan $(CONFIG) $(ARGS)

sweep: $(STAMP)
	$(BIN)/gemmascope sweep $(CONFIG) $(ARGS)

# The same as sweep, for cron: a tick that finds the previous one still running exits 0
# at once (flock), and launchers on other hosts are kept apart by the job leases.
resume: $(STAMP)
	flock --nonblock --conflict-exit-code 0 $(LOCK) $(BIN)/gemmascope sweep $(CONFIG) --no-progress $(ARGS)

status: $(STAMP)
	$(BIN)/gemmascope status $(CONFIG) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
