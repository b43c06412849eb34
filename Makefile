# stlib study: the two commands a new user needs are `make book` and `make test`.
#   make book   create .venv if missing, run every notebook on PROFILE (default demo) with
#               papermill into book/executed/, and build the Jupyter Book into _build/html
#   make test   the same environment, then pytest (unit tests + a papermill smoke run)
#   make bench  benchmarks (JSON into benchmarks/), shown on the book's benchmark page
#   make lab    JupyterLab (127.0.0.1, no browser) on working copies of the notebooks of PROFILE,
#               parameters filled from params/PROFILE.yaml, in the git-ignored lab/PROFILE/
#   make gpu-check  the GPU measurements (on a machine with a CUDA GPU; about 8 minutes)
#   make realtissue-models  retrain the real-tissue chapter's release pair into models/realtissue/ (~30 CPU
#               minutes, minutes on a GPU; `make book` only installs and scores the shipped pair)

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
PROFILE ?= demo
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.stlib-installed
PYTEST_ARGS ?=

.PHONY: book test bench bench-slide gpu-check lab env clean clean-runs help realtissue-models

help:
	@echo "make book   - install (if needed), run the study on PROFILE=$(PROFILE), render _build/html"
	@echo "make test   - install (if needed), run the test suite"
	@echo "make bench  - run the benchmarks into benchmarks/"
	@echo "make lab    - JupyterLab on the notebooks of PROFILE=$(PROFILE) (parameters editable, in lab/)"
	@echo "make bench-slide - label derivation of one slide-sized sample (benchmarks/derive_slide.json)"
	@echo "make gpu-check - GPU training/inference measurements (needs a CUDA GPU) into benchmarks/gpu_*.json"
	@echo "make realtissue-models - retrain the real-tissue release pair into models/realtissue (~30 CPU minutes)"

env: $(STAMP)

# The environment is rebuilt when the pinned dependencies change.
# tools/install_env.py installs the pinned environment on all cores (the pins of requirements.lock by two
# pip processes, then the project, `pip check`, and byte-compilation on all cores): the environment of
# `pip install -c requirements.lock -e .[dev]` in about 2.5 instead of 4.5 minutes on 2 cores.
$(STAMP): pyproject.toml requirements.lock tools/install_env.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install_env.py --venv $(VENV) --lock requirements.lock
	@touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/stlib run --profile $(PROFILE)

# The suite runs in TEST_WORKERS pytest-xdist processes, one test file per worker at a time
# (--dist loadfile: a file's session fixtures, e.g. the notebook smoke run, are built once);
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/stlib lab --profile $(PROFILE)

bench: $(STAMP)
	$(VENV)/bin/stlib bench labels --out benchmarks/labels.json
	$(VENV)/bin/stlib bench tiles --out benchmarks/tiles.json
	$(VENV)/bin/stlib bench refine --out benchmarks/refine.json
	$(VENV)/bin/stlib bench train --out benchmarks/train_cpu.json
	$(VENV)/bin/stlib bench infer --out benchmarks/infer_cpu.json
	$(VENV)/bin/stlib bench infer --slide --out benchmarks/infer_slide_cpu.json

# the whole label derivation of one 10 x 10 mm synthetic slide (~500k nuclei); generating the
# sample first takes a few minutes and ~0.5 GB in BENCH_WORK (reused by later runs)
BENCH_WORK ?= .bench-work
bench-slide: $(STAMP)
	$(VENV)/bin/stlib bench derive --work-dir $(BENCH_WORK) --out benchmarks/derive_slide.json

gpu-check: $(STAMP)
	$(VENV)/bin/stlib bench gpu-check --out-dir benchmarks

# The release pair of the real-tissue chapter (notebooks/07_real_tissue.ipynb): the chapter itself run with
# RELEASE_STEPS training steps in a run folder of its own (its release section off), then both networks packed
# with their provenance (command, commit, recipe, time, machine, sha256 of weights and training images) into
# models/realtissue/. The shipped pair (1500 steps): 1470 CPU s to train the two networks, 1769 CPU s for the
# whole chapter run, 48 min wall on the shared 2-core development machine at load average ~5.8
# (models/realtissue/release.json); on a GPU the training takes minutes. Packing gives the pair the
# post-processing chosen for its budget on the development images (benchmarks/realtissue_release_postproc.csv,
# stlib.realtissue.RELEASE_POSTPROC_RULE) when that grid holds RELEASE_STEPS; otherwise the recipe's, and it says so.
RELEASE_STEPS ?= 1500
RELEASE_RUN   ?= runs/realtissue-release
realtissue-models: $(STAMP)
	$(VENV)/bin/stlib run --profile demo --only 07_real_tissue --no-build --force \
	    --executed-dir $(RELEASE_RUN)/executed -p steps=$(RELEASE_STEPS) -p rt_run_dir=$(RELEASE_RUN) -p 'release_dir=""'
	$(PY) -m stlib.realtissue release --models $(RELEASE_RUN)/models/book --out models/realtissue \
	    --profile demo -p steps=$(RELEASE_STEPS) --executed $(RELEASE_RUN)/executed/07_real_tissue.ipynb \
	    --command "make realtissue-models RELEASE_STEPS=$(RELEASE_STEPS)"

clean-runs:
	rm -rf runs book/executed _build

clean: clean-runs
	rm -rf $(VENV) data
