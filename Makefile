# deep-compact-reid: one command each for the demo and the tests, on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
# The venv's python and console scripts (ray, mlflow, moto_server) come first, also for the Ray head we start.
export PATH := $(BIN):$(PATH)
export DS_ACCELERATOR ?= cpu
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench gpu-check lint format stack-up stack-down stack-status clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changed (or the venv is missing): a no-op in well under a second otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,devstack]'
	@touch $(STAMP)

stack-up: setup
	$(BIN)/python -m devstack.stack up

stack-down:
	@test -x $(BIN)/python && $(BIN)/python -m devstack.stack down || true

stack-status:
	$(BIN)/python -m devstack.stack status

# The whole system on this machine: loopback S3 + MLflow (sqlite) + a Ray head; synthetic MSMT17 into S3; the GAN job
# submitted to Ray exactly as on a cluster. The stack stays up afterwards: `mlflow ui` is at the printed address.
demo: stack-up
	set -a && . .stack/env && set +a && \
	$(BIN)/python jobs/make_dataset.py --layout msmt17 --ids 60 --cameras 4 --images-per-id 12 \
	    --out s3://$$REID_DATA_BUCKET/synthetic/msmt17 --overwrite && \
	$(BIN)/ray job submit --address $$RAY_API_SERVER_ADDRESS --working-dir . \
	    --runtime-env-json "$$($(BIN)/python -m devstack.stack runtime-env)" \
	    -- python jobs/train_gan.py --config configs/demo.yaml --set run.name=gan-demo-$$(date +%Y%m%d-%H%M%S)
	@echo "MLflow UI: $$(. .stack/env && echo $$MLFLOW_TRACKING_URI)   (store: .stack/mlflow.db, artifacts: .stack/mlartifacts)"

# Everything, slow end-to-end tests included (CI runs this), on 2 pytest-xdist workers, a whole module at a time (its
# module-scoped stacks stay on one worker; tests/conftest.py hands out the longest modules first). Run one test at a
# time, the suite keeps the 2 cores only ~55% busy (end-to-end tests wait on process starts, polls and injected
# outages): 23 min serial, ~11 min 30 s on 2 workers on the 2-core VM (docs/architecture.md, "Tests").
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The unit and component tests on 2 pytest-xdist workers (each starts its own loopback S3 server when a test needs one).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

# Every bench (bench/_*.py are helpers), one after the other: each merges its figures into bench/results.json; then the
# README's benchmark table is rewritten from that file (tests/test_bench_results.py checks that they agree).
bench: setup
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done
	$(BIN)/python bench/_results.py --readme

# Before a long job on a new GPU node (<= 8 minutes on one GPU): environment, GAN / CondenseNet step rates, loader,
# Δ share, inference and evaluation speed, through Ray Train + DeepSpeed as the jobs run; gpu-check/gpu_check.{json,md}.
# Without a GPU it runs its CPU dry mode (tests/test_gpu_check.py runs that in CI).
gpu-check: setup
	DS_ACCELERATOR=$$($(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") \
	    $(BIN)/python jobs/gpu_check.py --out gpu-check

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean: stack-down
	rm -rf .stack
