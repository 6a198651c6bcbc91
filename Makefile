# make demo: set up .venv and run the whole pipeline offline on the bundled demo.
# make test: set up .venv and run the test suite (what CI runs, via .ci/run).
# make bench: the dedup benchmark (lorapipe vs imagededup); prints a table.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# One thread per process: two torch threads on a busy 2-core box ran tiny training 7-30x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/lorapipe demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The dedup benchmark against imagededup. imagededup goes in with --no-deps: its torchvision
# requirement would pull a CUDA torch over the CPU one (see benchmarks/dedup_benchmark.py).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m pip install --quiet --no-deps imagededup==0.3.3.post2
	$(PY) benchmarks/dedup_benchmark.py

clean:
	rm -rf $(VENV) demo workspaces .pytest_cache
