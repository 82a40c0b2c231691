# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlprune-installed

.PHONY: setup test test-slow test-hf4 demo bench clean

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

# Opt-in: the vlprune.patch tests against the transformers 4.5x line, in a separate venv (make test runs 5.x).
HF4 ?= 4.57.6
HF4_VENV ?= .venv-hf4
test-hf4:
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/python -m pip install -q torch==2.13.0
	$(HF4_VENV)/bin/python -m pip install -q -e ".[dev]" "transformers==$(HF4)"
	$(HF4_VENV)/bin/python -m pytest -q -p no:xdist tests/test_patch.py tests/test_patch_cli.py tests/test_patch_lvlm.py tests/test_patch_lvlm_families.py \
		tests/test_patch_lvlm_sparsevlm.py tests/test_patch_lvlm_towers.py tests/test_vqa_lvlm.py

demo: $(STAMP)
	$(VENV)/bin/vlprune demo --out runs/demo

bench: $(STAMP)
	$(VENV)/bin/vlprune bench --model albef-base --method none --method trips --method elip --method evit --method tome --image-size 384 --text-len 40

clean:
	rm -rf $(VENV) $(HF4_VENV) build dist src/*.egg-info .pytest_cache
