# Stages as files: make rebuilds only what changed. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/fashion-mnist-mini
BACKBONE ?= efficientnet_lite0
WEIGHTS ?= default
IMAGE_SIZE ?=
# train,val,test fractions for the splits DATA does not give (carved out of its training images).
SPLIT ?=
CACHE_DIR ?= cache
RESULTS ?= results
HEADS ?= logreg,mlp,linear
SHOTS ?= 1,5,10,all
DRAWS ?= 3
UNFREEZE ?= 0,1,2
EPOCHS ?= 3
# make sweep: learning rates, then batch sizes, then UNFREEZE, each at the best so far (SWEEP=grid: all)
LRS ?= 0.1,0.01,0.001,0.0001,0.00001
BATCHES ?= 16,32,64,100
SWEEP ?= one-at-a-time
# make sweep's depths: the first is held while the learning rates and batch sizes are swept
SWEEP_UNFREEZE ?= 1,0,2
# What runs the frozen network (--engine: torch, onnxruntime, openvino, auto); unset: torch.
ENGINE ?=
# Processes (GPUs) on this machine for extract and finetune; set it to run them under torchrun.
NPROC ?=
BENCH_ARGS ?=

RUN := $(RESULTS)/$(notdir $(patsubst %/,%,$(DATA)))/$(subst /,_,$(BACKBONE))
FEATURES := $(RUN)/features.json
HEADS_TABLE := $(RUN)/heads/results.md
FINETUNE_TABLE := $(RUN)/finetune/freeze_depth.md
REPORT := $(RUN)/report/report.md
SWEEP_TABLE := $(RUN)/sweep/sweep.md
ADVICE := $(RUN)/advice/advice.json
# The cache file that `make features` recorded in its JSON summary.
CACHE_OF = $$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["cache_path"])' $(FEATURES))
DATA_FILES := $(shell find $(DATA) -type f 2>/dev/null)
STAGE := $(if $(NPROC),$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m pipeline,$(BIN)/pipeline)
EXTRACT_ARGS := --backbone $(BACKBONE) --weights $(WEIGHTS) --cache-dir $(CACHE_DIR) \
	$(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(SPLIT),--split $(SPLIT)) \
	$(if $(ENGINE),--engine $(ENGINE))

.PHONY: help install demo features heads selftrain distill pool-data finetune sweep advise drift report export-model test lint docs bench demo-data clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

# torch 2.14.1 / torchvision 0.29.1: the CUDA build that pip takes from this machine's disk.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install the package with its test tools

features: $(FEATURES) ## stage 1: bottleneck features of DATA with BACKBONE, cached in CACHE_DIR

$(FEATURES): $(BIN)/.installed $(DATA_FILES)
	@mkdir -p $(@D)
	$(STAGE) extract $(DATA) $(EXTRACT_ARGS) --write-json $@

heads: $(HEADS_TABLE) ## stage 2: fit HEADS on the cached features and compare them

$(HEADS_TABLE): $(FEATURES)
	$(BIN)/pipeline heads "$(CACHE_OF)" --heads '$(HEADS)' --out $(@D) \
		$(if $(SHOTS),--shots $(SHOTS) --draws $(DRAWS))

# The unlabelled pool of make selftrain and make distill: a flat folder of images, made by
# make pool-data (Fashion-MNIST images the demo does not hold) where it is missing.
POOL_DATA ?= data/fashion-mnist-pool
POOL_FEATURES := $(RUN)/pool-features.json
POOL_OF = $$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["cache_path"])' $(POOL_FEATURES))
SELFTRAIN_TABLE := $(RUN)/heads/self-train/results.md
DISTILL_TABLE := $(RUN)/distill/results.md
# The teacher of make distill: the network that make finetune trained with one block unfrozen.
TEACHER = $$(ls $(RUN)/finetune/unfreeze-1/models/*.net | head -n 1)

# The venv's Python: the script writes PNGs with Pillow, which the system Python may lack.
pool-data: $(BIN)/.installed ## write POOL_DATA: Fashion-MNIST images the demo does not hold, unlabelled (Debian's dataset-fashion-mnist)
	$(BIN)/python scripts/make_pool_data.py --out $(POOL_DATA)

$(POOL_DATA): | $(BIN)/.installed
	$(BIN)/python scripts/make_pool_data.py --out $@

$(POOL_FEATURES): $(BIN)/.installed | $(POOL_DATA)
	@mkdir -p $(@D)
	$(STAGE) extract $(POOL_DATA) $(EXTRACT_ARGS) --write-json $@

selftrain: $(SELFTRAIN_TABLE) ## stage 2 with the unlabelled POOL_DATA: HEADS and each one self-trained, paired
	@cat $(SELFTRAIN_TABLE)

$(SELFTRAIN_TABLE): $(FEATURES) $(POOL_FEATURES)
	$(BIN)/pipeline heads "$(CACHE_OF)" --heads '$(HEADS)' --out $(RUN)/heads \
		$(if $(SHOTS),--shots $(SHOTS) --draws $(DRAWS)) --unlabelled "$(POOL_OF)"

distill: $(DISTILL_TABLE) ## a student head taught by make finetune's unfreeze-1 network, on POOL_DATA too
	@cat $(DISTILL_TABLE)

$(DISTILL_TABLE): $(FINETUNE_TABLE) $(POOL_FEATURES)
	$(BIN)/pipeline distill "$(TEACHER)" "$(CACHE_OF)" --unlabelled "$(POOL_OF)" --out $(@D)

finetune: $(FINETUNE_TABLE) ## stage 3: fine-tune the top UNFREEZE blocks for EPOCHS, one run per depth

$(FINETUNE_TABLE): $(FEATURES)
	$(STAGE) finetune $(DATA) $(EXTRACT_ARGS) --unfreeze $(UNFREEZE) --epochs $(EPOCHS) \
		--out $(@D)

sweep: $(SWEEP_TABLE) ## fine-tuning sweep of LRS, BATCHES and SWEEP_UNFREEZE (SWEEP: one-at-a-time or grid), chosen on validation

$(SWEEP_TABLE): $(FEATURES)
	$(STAGE) finetune $(DATA) $(EXTRACT_ARGS) --lr $(LRS) --batch-size $(BATCHES) \
		--unfreeze $(SWEEP_UNFREEZE) --sweep $(SWEEP) --epochs $(EPOCHS) --out $(@D)

advise: $(ADVICE) ## how deep to train DATA: images per class, a probe of every block, LogME
	@$(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["sentence"])' $(ADVICE)

# Every block's features (one pass, a cache of their own), then the advice; the report says it.
$(ADVICE): $(BIN)/.installed $(DATA_FILES)
	$(BIN)/pipeline advise $(DATA) --backbone $(BACKBONE) --weights $(WEIGHTS) \
		--cache-dir $(CACHE_DIR) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) \
		$(if $(SPLIT),--split $(SPLIT)) --out $(@D) -q > /dev/null

# make drift NEW=<folder of new images, or their cache>: against the run's best model.
NEW ?=

drift: $(if $(NEW),$(HEADS_TABLE)) ## is NEW different from DATA, does it hurt the best model, what to retrain
	@test -n "$(NEW)" || { echo "make drift NEW=<folder of new images, or their cache>"; exit 2; }
	$(BIN)/pipeline drift "$(NEW)" --against $(RUN) --out $(RUN)/drift --cache-dir $(CACHE_DIR)

report: $(REPORT) ## heads and fine-tunes of DATA and BACKBONE in one table and chart
	@cat $(REPORT)

# The report is printed by the targets that ask for it (report, demo), from report.md, so it
# appears once whether it was just built or already there.
$(REPORT): $(HEADS_TABLE) $(FINETUNE_TABLE) $(ADVICE)
	$(BIN)/pipeline report $(RUN) --out $(@D) > /dev/null

# The image size the exported file takes (HEIGHT,WIDTH); unset: the recipe's crop.
INPUT_SIZE ?=

export-model: $(REPORT) ## the most accurate model of DATA and BACKBONE as one ONNX file (INPUT_SIZE: H,W)
	$(BIN)/pipeline export $(RUN) --out $(RUN)/model.onnx $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE))

demo: $(REPORT) ## run every stage on the bundled demo data and say where the results are
	@echo
	@echo "Transfer learning (heads on frozen features) against fine-tuning, test split:"
	@echo
	@cat $(REPORT)
	@echo
	@echo "features: $(CACHE_OF)"
	@echo "heads:    $(RUN)/heads/ (results, per_class, comparison.png, confusion_matrix.png,"
	@echo "          shots.png, models/*.head)"
	@echo "finetune: $(RUN)/finetune/unfreeze-K/ (history.csv|png, checkpoint.pt, models/*.net)"
	@echo "advice:   $(RUN)/advice/ (advice.md|json|png: how deep to train, and why)"
	@echo "report:   $(RUN)/report/report.html (one page: table, every plot, run records;"
	@echo "          also report.md|csv|json, forest.png, report.png)"
	@echo "predict:  $(BIN)/pipeline predict $(RUN)/heads/models/<model>.head IMAGES..."
	@echo "          (or a fine-tuned $(RUN)/finetune/unfreeze-K/models/<model>.net)"

test: $(BIN)/.installed ## run the test suite (installs first if needed)
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/pytest -q

# The site's tools, pinned in the docs extra; installed once beside the package's.
$(BIN)/.docs-installed: $(BIN)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

docs: $(BIN)/.docs-installed ## build the documentation site into site/ (a broken link or reference fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(BIN)/.installed ## ruff over the code
	$(BIN)/ruff check pipeline tests scripts

bench: $(BIN)/.installed ## startup against import torch, extraction throughput, cache hits, memory
	$(BIN)/python -m pipeline.bench --data $(DATA) --out bench $(BENCH_ARGS)

demo-data: ## regenerate data/fashion-mnist-mini from Debian's dataset-fashion-mnist
	$(PYTHON) scripts/make_demo_data.py

clean: ## remove caches and results (not the venv)
	rm -rf $(CACHE_DIR) $(RESULTS) bench site
