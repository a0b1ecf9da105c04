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

.PHONY: demo test test-slow chaos bench bench-peers lint harvest train plan sweep resume status clean
.PHONY: cluster-up cluster-down cluster-status submit

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
# The PyTorch peers live in their own environment (torch's CPU build first, as above).
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): benchmarks/peers-requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	touch $(PEERS_STAMP)

# Our JumpReLU and TopK steps against SAELens' and sparsify's, same shape, same machine.
bench-peers: $(STAMP) $(PEERS_STAMP)
	mkdir -p $(RESULTS)
	$(BIN)/gemmascope bench peers --python $(PEERS_VENV)/bin/python --d-in 2304 --width 16384 --batch 4096 --json \
		> $(RESULTS)/peers.json

bench: $(STAMP) bench-peers
	mkdir -p $(RESULTS)
	$(BIN)/gemmascope bench harvest --json > $(RESULTS)/harvest.json
	$(BIN)/gemmascope bench loader --json > $(RESULTS)/loader.json
	$(BIN)/gemmascope bench train-step --d-in 640 --width 4096 --batch 1024 --json > $(RESULTS)/train-step-small.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 256 --json > $(RESULTS)/train-step-16k.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --steps 2 --json \
		> $(RESULTS)/train-step-16k-recipe-batch.json
	$(BIN)/gemmascope bench train-step --d-in 640 --width 4096 --batch 1024 --group 8 --json > $(RESULTS)/train-step-group8.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --l0-fraction 0.01 --steps 2 --json \
		> $(RESULTS)/train-step-sparse.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 65536 --batch 1024 --l0-fraction 0.01 --steps 2 --json \
		> $(RESULTS)/train-step-sparse-65k.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --d-out 2304 --width 16384 --batch 4096 --l0-fraction 0.01 \
		--steps 2 --json > $(RESULTS)/train-step-sparse-transcoder.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --l0-fraction 0.01 --target-l0 45 \
		--steps 2 --json > $(RESULTS)/train-step-sparse-target-l0.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --topk 32 --steps 2 --json \
		> $(RESULTS)/train-step-sparse-topk.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --batchtopk 32 --steps 2 --json \
		> $(RESULTS)/train-step-sparse-batchtopk.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 16384 --batch 4096 --matryoshka 32 --steps 2 --json \
		> $(RESULTS)/train-step-sparse-matryoshka.json
	$(BIN)/gemmascope bench train-step --d-in 2304 --width 65536 --batch 1024 --group 2 --steps 2 --json \
		> $(RESULTS)/train-step-65k-group2.json
	$(BIN)/python benchmarks/step_layout.py --d-in 2304 --width 16384 --batch 1024 > $(RESULTS)/step-layout.json
	$(BIN)/python benchmarks/step_layout.py --d-in 2304 --width 65536 --batch 1024 --only batch_sum --steps 2 --rounds 2 \
		> $(RESULTS)/step-layout-65k.json
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

# A Ray cluster on GCP (infra/ray/*.yaml; README "Running on a cluster"). The dashboard and
# job server stay on the head's 127.0.0.1: `submit` reaches them through `ray dashboard`
# (an SSH port-forward) for the time of the submission. Every Ray port asks for the
# cluster's token (~/.ray/auth_token, generated here, copied to each node by the YAML).
CLUSTER ?= infra/ray/gcp-gpu.yaml
# What `submit` runs on the cluster: sweep (harvest first, then training) or harvest.
STAGE ?= sweep
DASHBOARD_PORT ?= 8265
RAY_JOBS := RAY_AUTH_MODE=token $(BIN)/ray job
ON_HEAD := export RAY_AUTH_MODE=token;
# ARGS once more single-quoted: the job's entrypoint is a shell command line on the head,
# run by `sh -c` (Ray quotes each word after `--`, so a whole line would be one word).
QUOTED_ARGS = '$(subst ','"'"',$(ARGS))'

cluster-up: $(STAMP)
	$(BIN)/python -c 'import googleapiclient' 2>/dev/null || \
		$(BIN)/python -m pip install --quiet 'google-api-python-client>=2.100,<3'
	$(BIN)/ray get-auth-token --generate > /dev/null
	$(BIN)/ray up -y $(CLUSTER)
	@echo "Cluster up. Next: make submit CLUSTER=$(CLUSTER) CONFIG=... ARGS='run_dir=gs://BUCKET/...'"
	@echo "Shell on the head: $(BIN)/ray attach $(CLUSTER)"

cluster-down: $(STAMP)
	$(BIN)/ray down -y $(CLUSTER)

cluster-status: $(STAMP)
	$(BIN)/ray exec $(CLUSTER) '$(ON_HEAD) ray status'
	$(BIN)/ray exec $(CLUSTER) '$(ON_HEAD) ray job list --address http://127.0.0.1:8265'
	$(BIN)/ray exec $(CLUSTER) "cd ~/gemmascope && gemmascope status $(CONFIG) "$(QUOTED_ARGS)

submit: $(STAMP)
	@set -e; \
	id="$${SUBMIT_ID:-gemmascope-$(STAGE)-$$(date +%Y%m%d-%H%M%S)}"; \
	args=$(QUOTED_ARGS); \
	mkdir -p runs; \
	$(BIN)/ray dashboard -p $(DASHBOARD_PORT) $(CLUSTER) > runs/.ray-dashboard-forward.log 2>&1 & fwd=$$!; \
	trap 'kill $$fwd 2>/dev/null || true' EXIT; \
	up=0; for i in $$(seq 60); do \
		$(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $(DASHBOARD_PORT)), 2)" \
			2>/dev/null && { up=1; break; }; \
		kill -0 $$fwd 2>/dev/null || break; \
		sleep 2; \
	done; \
	if [ $$up != 1 ]; then \
		echo "No job server at 127.0.0.1:$(DASHBOARD_PORT): the port-forward to $(CLUSTER) failed (runs/.ray-dashboard-forward.log)"; \
		exit 1; \
	fi; \
	$(RAY_JOBS) submit --address http://127.0.0.1:$(DASHBOARD_PORT) --submission-id "$$id" --no-wait \
		--working-dir . --runtime-env-json '{"excludes": [".venv", "runs", ".git", "benchmarks/results"]}' \
		-- sh -c "gemmascope $(STAGE) $(CONFIG) $$args"; \
	echo; \
	echo "Submitted $$id: gemmascope $(STAGE) $(CONFIG) $$args"; \
	echo "Follow its log:   $(BIN)/ray exec $(CLUSTER) '$(ON_HEAD) ray job logs -f $$id --address http://127.0.0.1:8265'"; \
	echo "  or, with the dashboard forwarded ($(BIN)/ray dashboard $(CLUSTER) &):"; \
	echo "                  $(RAY_JOBS) logs -f $$id --address http://127.0.0.1:$(DASHBOARD_PORT)"; \
	echo "Stop it:          $(BIN)/ray exec $(CLUSTER) '$(ON_HEAD) ray job stop $$id --address http://127.0.0.1:8265'"; \
	echo "Cluster status:   make cluster-status CLUSTER=$(CLUSTER) CONFIG=$(CONFIG) ARGS=..."; \
	echo "Shell on head:    $(BIN)/ray attach $(CLUSTER)"
