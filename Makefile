# fedspatial: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install install-fm demo test test-deploy test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch first, so no dependency pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The optional foundation-model encoder (model.encoder: novae) for a user install; `make install`
# already brings it, since its tests are part of the test suite.
install-fm: $(STAMP)
	$(PIP) install --quiet -e ".[fm]"

demo: $(STAMP)
	$(VENV)/bin/fedspatial simulate configs/demo.yaml --run-name demo-$$(date +%Y%m%d-%H%M%S)

# Everything but the `slow` tests; this includes the deployment suite's real-process tests
# except its two longest (a site lost mid-run, the SuperLink restarted mid-run).
test: $(STAMP)
	$(PY) -m pytest -q

# The whole deployment suite (tests/test_deploy.py: real SuperLink and SuperNodes on 127.0.0.1),
# its two `slow` tests included.
test-deploy: $(STAMP)
	$(PY) -m pytest -q -m deploy -o addopts=""

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/backbone.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
