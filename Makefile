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
		--cfg 3 --steps 16 --out $(DEMO)/samples.npz
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

# LASAD's SAD ablation at toy scale (reference/lasad.md Table 4): LASADGen with spatial-aware decay (keep),
# without it (off), and LlamaGen's softmax, same config/seed/steps; prints class consistency at cfg 1 and 2.
# Each run lives in runs/ablation/<name> (checkpoints/, tensorboard/); a bare `off` reads as
# false, which the raster config takes for "off".
LASAD := runs/lasad_demo
ABLATION_EPOCHS ?= 48
lasad-ablation: setup
	$(BIN)/lina data build --source digits --out $(DIGITS) --overwrite
	$(BIN)/lina tokenizer fit --data $(DIGITS) --out $(LASAD)/tokenizer.npz --codebook-size 256
	set -e; for run in "keep sad_mode keep" "off sad_mode off" "softmax mixer softmax"; do \
	  set -- $$run; out=runs/ablation/$$1; \
	  $(BIN)/lina fit --config configs/raster/demo.yaml --trainer.max_epochs $(ABLATION_EPOCHS) \
	    --trainer.default_root_dir $$out --model.generator_options.$$2 $$3; \
	  for cfg in 1 2; do \
	    $(BIN)/lina sample --ckpt $$out/checkpoints/last.ckpt --classes 0 1 2 3 4 5 6 7 8 9 --per-class 50 \
	      --cfg $$cfg --out $$out/samples_cfg$$cfg.npz; \
	    echo "$$1 cfg $$cfg: $$($(BIN)/lina evaluate consistency --samples $$out/samples_cfg$$cfg.npz --data $(DIGITS) | tail -1)" \
	      | tee -a runs/ablation/summary.txt; \
	  done; \
	done

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
