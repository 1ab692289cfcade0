# The two commands: `make demo` (the main job) and `make test`. Both set up .venv when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision as a matched pair (open_clip needs torchvision); pip finds both on this machine's disk.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-slow demo bench train-demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# one pytest-xdist worker per core, at most 4 (each holds its own torch, diffusers and models: 1-4.6 GB), with the
# cores shared out as torch threads (tests/conftest.py): half the wall time of one process on 2 cores, since most
# tests are tiny models whose time is Python's. PYTEST_WORKERS=0 runs them in this process. Work stealing (xdist
# >= 3.2): an idle worker takes queued tests from a busy one, so a long test late in a worker's queue (the compile
# test: 55-80 s) leaves no core idle at the end: 10:03 against 11:55 for the default split, back to back on 2 cores.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

DEMO_PROMPT ?= a large blue star in the top right corner on a black background

demo: setup
	@test -f pipelines/tiny-shapes/model_index.json || { echo "pipelines/tiny-shapes is missing: run make train-demo"; exit 1; }
	@$(BIN)/latentdiff generate "$(DEMO_PROMPT)" --out out/demo --force | sed 's/^/image written to /'

# Train the embedded pipeline from scratch (VAE, then U-Net + text encoder) and write pipelines/tiny-shapes.
train-demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash training/train_demo.sh

# Speed against diffusers, measured in one process (see benchmarks/).
bench: setup
	@for script in benchmarks/roofline.py benchmarks/unet.py benchmarks/vae.py benchmarks/pipeline.py; do \
	  if [ -f $$script ]; then $(BIN)/python $$script || exit 1; fi; done

clean:
	rm -rf $(VENV)
