# Everything a fresh machine needs goes through these targets: nothing is installed by hand.
# torch is pinned to the CPU wheel on this kind of machine's disk; an unpinned torch would
# pull a multi-GB CUDA build. On a GPU machine, install torch first and `pip install -e .`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo sweep-demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

# The main job on the embedded default data: the FP8 baseline, then full FP4 with H16 on Wgrad.
demo: install
	$(VENV)/bin/fp4-ablate run
	$(VENV)/bin/fp4-ablate run +ladder=wgrad +stabilizer=h16

# The whole default grid on the demo config, then the token-cost table and plots.
sweep-demo: install
	$(VENV)/bin/fp4-ablate sweep
	$(VENV)/bin/fp4-ablate report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
