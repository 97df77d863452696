# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create .venv, install the CPU torch wheel first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then the package. On a GPU cluster: make TORCH="torch==2.13.0 --index-url ..." setup

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo t2i-demo lasad-ablation test lint bench gpu-test clean

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
		--cfg 2 --steps 16 --out $(DEMO)/samples.npz
	$(BIN)/lina evaluate consistency --samples $(DEMO)/samples.npz --data $(DIGITS)

# Text-to-image: digit-scene shards with MiniLM features -> train LINA T2I on CPU -> 300 balanced prompts ->
# samples.npz + PNG grid -> GenEval-style per-task accuracy and overall score (JSON).
SCENES := data/shards/digit_scenes
T2I := runs/t2i_demo
t2i-demo: setup
	$(BIN)/lina data build --source digit-scenes --out $(SCENES) --text-encoder bundled:minilm \
		--text-max-length 16 --batch-size 256 --overwrite
	$(BIN)/lina fit --config configs/t2i/demo.yaml
	$(BIN)/lina evaluate geneval-digits --make-prompts 300 --out $(T2I)/prompts.txt
	$(BIN)/lina sample --ckpt $(T2I)/checkpoints/last.ckpt --prompts $(T2I)/prompts.txt --per-prompt 1 \
		--out $(T2I)/samples.npz
	$(BIN)/lina evaluate geneval-digits --samples $(T2I)/samples.npz

# LASAD's mixer and spatial-aware-decay ablations at toy scale (reference/lasad.md Tables 2 and 4): every
# variant of configs/ablations/lasad.yaml (LASADGen with and without SAD, GLA with and without it, TNL, linear
# attention + RoPE, LlamaGen's softmax) trained from the same config for ABLATION_STEPS steps per seed, then
# runs/ablations/lasad/table.md: validation loss and FID/KID/IS/precision/recall of 500 samples, mean ± std
# over the seeds. Each run lives in runs/ablations/lasad/<variant>/seed<k>; a rerun keeps the finished ones.
LASAD := runs/lasad_demo
ABLATION_STEPS ?= 400
ABLATION_SEEDS ?= 0 1
lasad-ablation: setup
	$(BIN)/lina data build --source digits --out $(DIGITS) --overwrite
	$(BIN)/lina tokenizer fit --data $(DIGITS) --out $(LASAD)/tokenizer.npz --codebook-size 256
	$(BIN)/lina ablate --suite lasad --max-steps $(ABLATION_STEPS) --seeds $(ABLATION_SEEDS) --resume

lint: setup
	$(BIN)/ruff check lina_pl tests notebooks

test: setup lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/lina bench attention

gpu-test: setup
	$(BIN)/python -m pytest -m gpu -v

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
