# Two commands do all the set-up on a fresh machine:
#   make demo   one image generated end to end, offline (tiny model, local storage, no Ollama)
#   make test   the whole test suite: Python (lint, types, tests) and the Cloudflare Worker
# A bare `make` installs the command line into .venv; `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= a lighthouse on a cliff at dusk

.PHONY: install help demo test test-python test-worker test-browser lint schemas bench bench-gpu \
	clean
.DEFAULT_GOAL := install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU wheel pip finds at hand (find-links); a range admitting newer
# releases, or PyPI's own Linux wheel, is a multi-GB CUDA build (docs/development.md). On Linux
# with no find-links configured, the wheel comes from PyTorch's CPU index.
TORCH_INDEX ?= $(shell [ "$$(uname -s)" = Linux ] && [ -z "$$PIP_FIND_LINKS" ] \
	&& ! $(PYTHON) -m pip config list 2>/dev/null | grep -q find-links \
	&& echo --index-url https://download.pytorch.org/whl/cpu)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e ".[render,ledger,test]"
	touch $@

install: $(VENV)/.installed ## the imagegen command line, with its test tools, into .venv

help: ## these targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## /{printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: $(VENV)/.installed ## one image end to end, offline (PROMPT="...")
	$(BIN)/imagegen generate "$(PROMPT)" --model tiny --width 256 --height 256 --output ./output
	@echo "record  beside the image: <id>.json, with its thumbnail and WebP/AVIF versions"
	@echo "next    . $(VENV)/bin/activate; imagegen history; imagegen doctor (docs/cli.md)"

lint: $(VENV)/.installed ## ruff, ruff format --check and mypy on the Python
	$(BIN)/ruff check imagegen plugins functions tests benchmarks
	$(BIN)/ruff format --check imagegen plugins functions tests benchmarks
	$(BIN)/mypy
	MYPYPATH=functions $(BIN)/mypy functions/*.py

# Two workers on two cores, a module per worker (loadscope), so a module's servers start once;
# tests/conftest.py hands out the slow modules first. Measured on 2026-12-03: 155-166 s of wall
# time and 246-253 CPU seconds with two workers, 182-204 s and 306-337 CPU seconds with three
# (each worker collects the suite and imports torch itself, and a third only adds contention
# now that the tests' torch runs on one thread per process).
test-python: $(VENV)/.installed ## the Python tests
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

worker/node_modules/.package-lock.json: worker/package-lock.json
	cd worker && npm ci --no-audit --no-fund

test-worker: worker/node_modules/.package-lock.json ## the Worker: tsc, prettier --check, its tests
	cd worker && npm run typecheck && npm run format:check && npm test

# The Worker under wrangler dev, moto S3 as its origin, pages in Debian's Chromium.
test-browser: worker/node_modules/.package-lock.json $(VENV)/.installed ## the Worker in Chromium
	cd worker && npm run test:browser

test: lint test-worker test-python test-browser ## the four above: what CI runs

schemas: $(VENV)/.installed ## regenerate schemas/ and docs/openapi/
	$(BIN)/python -m imagegen.schemas schemas
	$(BIN)/python -m imagegen.openapi docs/openapi

bench: $(VENV)/.installed ## the CPU benchmarks
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/otlp_overhead.py
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/remote_context.py

# Needs a CUDA GPU and the served model in the Hugging Face cache; under 10 minutes.
# With the prod overlay's PNG settings (knative/overlays/prod/config.yaml): what render does there.
bench-gpu: $(VENV)/.installed ## the GPU benchmark (CUDA)
	IMAGEGEN_PNG_COMPRESS_STRATEGY=rle IMAGEGEN_PNG_ENCODE_THREADS=4 $(BIN)/python benchmarks/gpu.py

clean: ## remove .venv, output and the caches
	rm -rf $(VENV) output worker/node_modules .pytest_cache .mypy_cache .ruff_cache
