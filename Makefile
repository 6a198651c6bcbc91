# make demo: set up .venv and run the whole pipeline offline on the bundled demo.
# make test: set up .venv and run the test suite (what CI runs, via .ci/run).
# make bench: every benchmark (lorapipe's code against the named reference, one table each):
#   make bench-dedup    dedup vs imagededup
#   make bench-caption  lorapipe's captioner vs plain transformers generate (tiny LLaVA on a CPU)
#   make bench-cli      a cached stage command: temporary server per command vs `lorapipe server start`
#   make bench-train    dispatched ops per step (SDXL + tiny), step time vs the plain diffusers+peft
#                       loop (tiny UNet on a CPU, SDXL on a GPU), one step of each Lion
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# One thread per process: two torch threads on a busy 2-core box ran tiny training 7-30x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench bench-dedup bench-caption bench-cli bench-train install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/lorapipe demo

# Two test processes (pytest-xdist), a test file to each at a time: much of the suite waits on Prefect
# servers, browsers and subprocesses, so two workers on 2 cores finish in about half the time.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: bench-dedup bench-caption bench-cli bench-train

# The dedup benchmark against imagededup. imagededup goes in with --no-deps: its torchvision
# requirement would pull a CUDA torch over the CPU one (see benchmarks/dedup_benchmark.py).
bench-dedup: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m pip install --quiet --no-deps imagededup==0.3.3.post2
	$(PY) benchmarks/dedup_benchmark.py

bench-caption: $(STAMP)
	$(PY) benchmarks/caption_benchmark.py

bench-cli: $(STAMP)
	$(PY) benchmarks/cli_stage_benchmark.py

bench-train: $(STAMP)
	$(PY) benchmarks/step_ops.py
	$(PY) benchmarks/train_step_benchmark.py
	$(PY) benchmarks/train_step_benchmark.py --optimizers

clean:
	rm -rf $(VENV) demo workspaces .pytest_cache
