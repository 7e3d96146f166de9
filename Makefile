# Set-up and checks. Every target creates the environment it needs (.venv) first.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.htd-installed
PYTEST_ARGS ?= -n 2

.PHONY: install browser test test-slow lint demo clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; the package is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,eval,dev,bench]'
	touch $@

# Debian's chromium + chromedriver for the reader-study page test; where they cannot be installed (not
# root, no apt) that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the reader-study browser test will be skipped"

test: install browser
	$(BIN)/htd-toolkit sample-data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/htd-toolkit sample-data
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m slow

demo: install
	$(BIN)/htd-toolkit demo --out demo-output

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo-output
