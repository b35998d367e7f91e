# `make demo` and `make test` each do all set-up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The torch pair that resolves offline on the reference machines; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_SET   ?=

.PHONY: setup fashion-mnist demo smoke test lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

fashion-mnist:
	@if [ ! -e "$(FMNIST_DIR)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing the Fashion-MNIST Debian package"; \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else \
	    echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'," \
	         "or set data.root, or data.download=true (needs the internet)"; exit 1; \
	  fi; \
	fi

demo: setup fashion-mnist
	$(VENV)/bin/contrastive run workflows/configs/demo.yaml $(DEMO_SET)

smoke: setup
	$(VENV)/bin/contrastive run workflows/configs/smoke.yaml

test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing'; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check pipeline workflows tests benchmarks
	$(VENV)/bin/ruff format --check pipeline workflows tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/step_throughput.py
	$(PY) benchmarks/pipeline_throughput.py
	$(PY) benchmarks/orchestration_overhead.py
	$(PY) benchmarks/thread_layout.py
	$(PY) benchmarks/read_formats.py
	$(PY) benchmarks/stream_loader.py
	$(PY) benchmarks/stream_vs_memory.py
	$(PY) benchmarks/stream_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info

# Both images of docker/ (needs Docker and the internet; not part of `make test`).
IMAGE_REPO  ?= contrastive-pipeline
RAY_VERSION ?= 2.60.0
IMAGE_TAG   ?= 0.1.0-ray$(RAY_VERSION)
.PHONY: docker
docker:
	docker build -f docker/Dockerfile.cpu --build-arg TORCH_SPEC="$(TORCH_SPEC)" -t $(IMAGE_REPO):$(IMAGE_TAG)-cpu .
	docker build -f docker/Dockerfile.gpu --build-arg TORCH_SPEC="$(TORCH_SPEC)" -t $(IMAGE_REPO):$(IMAGE_TAG)-gpu .
