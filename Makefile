# Set-up and entry points. `make demo` and `make test` create .venv when missing, install the
# pinned dependencies (requirements/constraints.txt) and run. Nothing else is needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test test-unit lint venv browser sandbox clean

$(STAMP): pyproject.toml setup.py requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mergeaudit demo

# The report test opens the HTML report in headless Chromium. Debian's package is installed
# when it is missing and apt-get can run (root); elsewhere that one test skips, unless
# MERGEAUDIT_REQUIRE_CHROMIUM is set (CI sets it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) ; } || \
	  echo "chromium not installed: the report's browser test will skip"

# Model-generated code runs in bubblewrap (Debian's package bubblewrap), as an unprivileged user in
# its own namespaces. Installed when missing and apt-get can run (root); elsewhere scoring code
# refuses to run (evaluation.code_isolation: bwrap) and the sandbox tests skip, unless
# MERGEAUDIT_REQUIRE_BWRAP is set (set it in CI). The demo scores no code, so it does not need it.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) ; } || \
	  echo "bubblewrap not installed: code tasks will refuse to score and the sandbox tests will skip"

# Test tiers (tests/conftest.py): `make test` runs all of them, as CI does (.ci/run); `make
# test-unit` is plain `pytest`: the unit tier, in-process, in about 2 minutes on 2 cores.
test: $(STAMP) browser sandbox
	$(BIN)/python -m pytest -m "unit or integration or slow"

test-unit: $(STAMP)
	$(BIN)/python -m pytest

# ruff (pinned in requirements/constraints.txt) with the rules in pyproject.toml's [tool.ruff], and
# whether the code is as `ruff format` would write it. Not part of `make test` or .ci/run.
LINT_PATHS := mergeaudit tests flows tasks deployments benchmarks scripts setup.py
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) .mergeaudit .pytest_cache
