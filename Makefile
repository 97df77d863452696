# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create .venv, install the CPU torch wheel first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then the package. On a GPU cluster: make TORCH="torch==2.13.0 --index-url ..." setup

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench gpu-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

DIGITS := data/shards/digits
DEMO := runs/demo

# The embedded default: digits shards -> train LINA on CPU -> samples.npz + PNG grid -> class consistency.
demo: setup
	$(BIN)/lina data build --source digits --out $(DIGITS) --overwrite
	$(BIN)/lina fit --config configs/c2i/demo.yaml
	$(BIN)/lina sample --ckpt $(DEMO)/checkpoints/last.ckpt --classes 0 1 2 3 4 5 6 7 8 9 --per-class 10 \
		--cfg 3 --steps 16 --out $(DEMO)/samples.npz
	$(BIN)/lina evaluate --samples $(DEMO)/samples.npz --data $(DIGITS)

lint: setup
	$(BIN)/ruff check lina_pl tests

test: setup lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/lina bench attention

gpu-test: setup
	$(BIN)/python -m pytest -m gpu -v

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
