# Everything a fresh machine needs: `make demo` runs tpo on the bundled model, `make test` runs the tests.
# Both build a virtual environment in .venv first (llama-cpp-python compiles from source once,
# about 10 minutes; pip caches the wheel afterwards).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= local,openai,hf,math,data,serve,ray,dev
comma := ,
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install browser demo test test-fast lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is installed on its own, pinned to the CPU build this machine provides, before anything
# that depends on it, so that pip never pulls a CUDA build.
$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

demo: install
	$(BIN)/tpo run "$(PROMPT)"

# The HTML report is tested in Debian's headless Chromium; install it when we can (root with apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not found; the report's browser test will be skipped"; fi; }

test: install browser
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV)
