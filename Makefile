# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlprune-installed

.PHONY: setup test test-slow demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/vlprune demo --out runs/demo

bench: $(STAMP)
	$(VENV)/bin/vlprune bench --model albef-base --method none --method trips --method elip --method evit --method tome --image-size 384 --text-len 40

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
