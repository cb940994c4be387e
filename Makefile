# FlatDINO pipeline. `make help` lists the targets; every variable below can be overridden on the command line,
# e.g. `make features RUN=in1k DATA=/data/imagenet ENCODER=nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 NPROC=8`.
# Stages are chained through their manifest.json files, so make rebuilds only what is missing; a stage that is
# re-run on a finished artifact does nothing, an interrupted one resumes.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUN     ?= demo# run name: artifacts go to shards/<stage>/$(RUN)
DATA    ?= digits# 'digits', an ImageFolder dir, or a quoted tar glob
NPROC   ?= 1# processes per machine (GPUs); >1 uses accelerate launch --multi_gpu
ENCODER ?= shards/encoder/$(RUN)# RAE dir or hub id; the demo writes a random one (init-encoder)
ENCODER_PRESET ?= $(if $(filter demo,$(RUN)),demo,tiny)# init-encoder preset when ENCODER is shards/encoder/...
VIEWS   ?= $(if $(filter demo,$(RUN)),1,2)# the demo's digits must not be mirrored
SEED    ?= 0

IMAGES_ARGS   ?=
FEATURES_ARGS ?=
VAE_ARGS      ?= $(if $(filter demo,$(RUN)),--preset demo --variant demo --standardize-features,)
LATENTS_ARGS  ?=
# the demo's DiT trains on standardised latents (the official `-norm`): raw, each VAE run's latent scale (std 0.70 vs
# 0.84 over two thread counts) set the DiT's signal-to-noise schedule, and w = 2 recall moved 0.05 with it
DIT_ARGS      ?= $(if $(filter demo,$(RUN)),--preset T --global-batch 64 --lr 2e-3 --ema-decay 0.995 --kappa 2 --standardize-latents --steps 2000 --ckpt-every 500,--preset XL)
DECODER_ARGS  ?= $(if $(filter demo,$(RUN)),--preset demo,--steps 0 --decoder-size same)# ImageNet: package the pretrained RAE decoder as is
SAMPLE_ARGS   ?= $(if $(filter demo,$(RUN)),--per-class 20,--per-class 50)
CFG           ?= 2.0# guidance scale of `make sample` (the official sampling script's example; the paper does not publish its w); `make fid-unguided` is w = 1
FID_ARGS      ?=
REFERENCE     ?= $(S)/fid-ref/$(RUN)# what `make fid` compares with: a fid-ref artifact, or ADM's VIRTUAL_imagenet256_labeled.npz

S := shards
IMAGES_M   := $(S)/images/$(RUN)/manifest.json
FEATURES_M := $(S)/features/$(RUN)/manifest.json
VAE_M      := $(S)/vae/$(RUN)/manifest.json
LATENTS_M  := $(S)/latents/$(RUN)/manifest.json
DIT_M      := $(S)/dit/$(RUN)/manifest.json
DECODER_M  := $(S)/decoder/$(RUN)/manifest.json
SAMPLES_M  := $(S)/samples/$(RUN)/manifest.json
FIDREF_M   := $(S)/fid-ref/$(RUN)/manifest.json
CLASSIFIER_M := $(S)/classifier/$(RUN)/manifest.json
METRICS    := $(S)/fid/$(RUN)/metrics.json
SAMPLES_U_M := $(S)/samples/$(RUN)-unguided/manifest.json
METRICS_U  := $(S)/fid/$(RUN)-unguided/metrics.json
REPORT_M   := $(S)/report/$(RUN)/manifest.json
REPORT     := $(S)/report/$(RUN)/metrics.json
REPORT_ARGS ?= --seed 0 --seed 1 --seed 2 --per-class 100# the demo report: 3 seeds x 1,000 samples per guidance scale
INSTALLED  := $(VENV)/.installed

FLATDINO := $(BIN)/flatdino
ifeq ($(NPROC),1)
LAUNCH := $(FLATDINO)
else
LAUNCH := $(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) -m pipeline
endif
# the demo encoder is a local random-weight directory made by `flatdino init-encoder`; a hub id needs no target
ENCODER_DEP := $(if $(wildcard $(ENCODER)),,$(if $(findstring $(S)/encoder/,$(ENCODER)),$(ENCODER)/config.json,))
DEMO_CLASSIFIER := $(if $(filter demo,$(RUN)),--classifier $(S)/classifier/$(RUN),)# the digits demo's class-consistency
# $(call sample,NAME,ARGS[,SEED]): samples of this run's networks into shards/samples/NAME (seed: SEED or $(SEED));
# $(call fid,NAME): their metrics
sample = $(LAUNCH) sample --dit $(S)/dit/$(RUN) --vae $(S)/vae/$(RUN) --decoder $(S)/decoder/$(RUN) \
	--out $(S)/samples/$(1) --seed $(or $(3),$(SEED)) $(2)
fid = $(LAUNCH) fid --samples $(S)/samples/$(1) --reference $(REFERENCE) --encoder $(ENCODER) \
	--out $(S)/fid/$(1) $(DEMO_CLASSIFIER) $(FID_ARGS) && touch $(S)/fid/.ran-$(RUN)

.PHONY: help install test test-slow test-gpu demo images features train-vae latents train-dit decoder sample \
        sample-unguided fid fid-unguided fid-ref classifier report reconstruct rfid flops bench clean-demo

help: ## show this help
	@echo "FlatDINO pipeline: images -> features -> train-vae -> latents -> train-dit -> sample -> fid"
	@echo "Variables: RUN=$(RUN) DATA=$(DATA) ENCODER=$(ENCODER) NPROC=$(NPROC) VIEWS=$(VIEWS)"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-16s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(INSTALLED) ## create .venv and install the project (torch 2.14.1) into it

test: $(INSTALLED) ## the quick offline test suite (about 8 minutes on 2 CPU cores)
	$(BIN)/pytest -q -m "not slow and not gpu"

test-slow: $(INSTALLED) ## the slow tests (multi-process launches, fault variants; ~4 min); CI runs them too
	$(BIN)/pytest -q -m "slow and not gpu"

test-gpu: $(INSTALLED) ## CUDA-only tests (bf16, xformers parity); needs a GPU
	$(BIN)/pytest -q -m gpu

demo: $(METRICS) $(METRICS_U) $(REPORT_M) ## the whole chain on the bundled digits with tiny presets (CPU, minutes)
	@echo
	@if [ -f $(S)/fid/.ran-$(RUN) ]; then rm $(S)/fid/.ran-$(RUN); echo "demo complete."; \
	 else echo "demo: nothing to do, every stage's artifact is complete (make clean-demo to start again)."; fi
	@echo "Look at:"
	@echo "  sample grid   $(S)/samples/$(RUN)/grid.png"
	@echo "  metrics       $(METRICS)"
	@echo "  VAE losses    $(S)/vae/$(RUN)/loss.png   (tensorboard --logdir $(S))"
	@echo "  unguided      $(METRICS_U)"
	@echo "  demo report   $(REPORT)"
	@echo "The grids' samples (seed $(SEED), make fid):"
	@$(BIN)/python -c "import json; m = json.load(open('$(METRICS)')); print('  w = $(CFG)  ', m.get('summary', ''))"
	@$(BIN)/python -c "import json; m = json.load(open('$(METRICS_U)')); print('  w = 1    ', m.get('summary', ''))"
	@echo "The report (make report: the headline, each digit metric over 3 sampling seeds):"
	@$(BIN)/python -c "import json; [print('  ', l) for l in json.load(open('$(REPORT)'))['summary']]"

images: $(IMAGES_M) ## image shards from DATA
$(IMAGES_M): | $(INSTALLED)
	$(FLATDINO) images --source '$(DATA)' --out $(S)/images/$(RUN) $(IMAGES_ARGS)

$(S)/encoder/%/config.json: | $(INSTALLED)
	$(FLATDINO) init-encoder --preset $(ENCODER_PRESET) --seed $(SEED) --out $(S)/encoder/$*

features: $(FEATURES_M) ## DINOv2 patch-feature shards (NPROC processes)
$(FEATURES_M): $(IMAGES_M) $(ENCODER_DEP)
	$(LAUNCH) features --images $(S)/images/$(RUN) --encoder $(ENCODER) --out $(S)/features/$(RUN) \
		--views $(VIEWS) $(FEATURES_ARGS)

train-vae: $(VAE_M) ## train the FlatDINO beta-VAE on the feature shards
$(VAE_M): $(FEATURES_M)
	$(LAUNCH) train-vae --features $(S)/features/$(RUN) --out $(S)/vae/$(RUN) $(VAE_ARGS)

latents: $(LATENTS_M) ## FlatDINO posterior means -> latents.zarr (+ exact per-(token, channel) stats)
$(LATENTS_M): $(FEATURES_M) $(VAE_M)
	$(LAUNCH) latents --features $(S)/features/$(RUN) --vae $(S)/vae/$(RUN) --out $(S)/latents/$(RUN) $(LATENTS_ARGS)

train-dit: $(DIT_M) ## train the LightningDiT generator on the latents
$(DIT_M): $(LATENTS_M)
	$(LAUNCH) train-dit --latents $(S)/latents/$(RUN) --out $(S)/dit/$(RUN) $(DIT_ARGS)

decoder: $(DECODER_M) ## train a pixel decoder (DINOv2 features -> RGB) for this encoder
$(DECODER_M): $(IMAGES_M) $(FEATURES_M)
	$(LAUNCH) train-decoder --images $(S)/images/$(RUN) --features $(S)/features/$(RUN) --encoder $(ENCODER) \
		--out $(S)/decoder/$(RUN) $(DECODER_ARGS)

sample: $(SAMPLES_M) ## class-balanced samples: samples.npz (ADM format) + grid.png
$(SAMPLES_M): $(DIT_M) $(VAE_M) $(DECODER_M)
	$(call sample,$(RUN),--cfg-scale $(CFG) $(SAMPLE_ARGS))

sample-unguided: $(SAMPLES_U_M) ## the same samples without guidance (w = 1), for the paper's gFID without CFG
$(SAMPLES_U_M): $(DIT_M) $(VAE_M) $(DECODER_M)
	$(call sample,$(RUN)-unguided,$(SAMPLE_ARGS) --cfg-scale 1)

report: $(REPORT_M) ## the demo's diversity, precision/recall and class-consistency at w = CFG and 1, 3 seeds each
$(REPORT_M): $(METRICS) $(METRICS_U) $(CLASSIFIER_M) $(DIT_M) $(VAE_M) $(DECODER_M)
	$(LAUNCH) demo-report --dit $(S)/dit/$(RUN) --vae $(S)/vae/$(RUN) --decoder $(S)/decoder/$(RUN) \
		--classifier $(S)/classifier/$(RUN) --fid $(S)/fid/$(RUN) --fid $(S)/fid/$(RUN)-unguided \
		--cfg-scale $(CFG) --cfg-scale 1 $(REPORT_ARGS) --out $(S)/report/$(RUN) && touch $(S)/fid/.ran-$(RUN)

classifier: $(CLASSIFIER_M) ## the demo's digit classifier, trained on the real training images
$(CLASSIFIER_M): $(IMAGES_M)
	$(FLATDINO) train-classifier --images $(S)/images/$(RUN) --out $(S)/classifier/$(RUN)

fid-ref: $(FIDREF_M) ## reference statistics (Inception when available, DINOv2) from the image shards
$(FIDREF_M): $(IMAGES_M) $(ENCODER_DEP)
	$(LAUNCH) fid-ref --images $(S)/images/$(RUN) --encoder $(ENCODER) --out $(S)/fid-ref/$(RUN)

fid: $(METRICS) ## FID / IS / precision / recall / FD-DINOv2 (+ class-consistency for the digits)
REFERENCE_DEP := $(if $(filter $(S)/fid-ref/$(RUN),$(REFERENCE)),$(FIDREF_M),)
$(METRICS): $(SAMPLES_M) $(REFERENCE_DEP) $(if $(DEMO_CLASSIFIER),$(CLASSIFIER_M),)
	$(call fid,$(RUN))

fid-unguided: $(METRICS_U) ## the same metrics for the unguided samples
$(METRICS_U): $(SAMPLES_U_M) $(REFERENCE_DEP) $(if $(DEMO_CLASSIFIER),$(CLASSIFIER_M),)
	$(call fid,$(RUN)-unguided)

reconstruct: $(VAE_M) $(DECODER_M) ## originals vs RAE vs FlatDINO reconstructions of the val split (for rFID)
	$(FLATDINO) reconstruct --images $(S)/images/$(RUN) --features $(S)/features/$(RUN) --vae $(S)/vae/$(RUN) \
		--decoder $(S)/decoder/$(RUN) --out $(S)/reconstruct/$(RUN)

rfid: reconstruct ## rFID / FD-DINOv2 of the FlatDINO reconstructions against their originals
	$(LAUNCH) fid --samples $(S)/reconstruct/$(RUN)/flatdino.npz --reference $(S)/reconstruct/$(RUN)/originals.npz \
		--encoder $(ENCODER) --out $(S)/rfid/$(RUN) $(FID_ARGS)

flops: $(INSTALLED) ## parameters and GMACs per forward / training step, 32x128 latents vs 256x768 grids
	$(FLATDINO) flops

bench: $(INSTALLED) ## benchmarks that print figures (see bench/RESULTS.md)
	$(BIN)/python bench/plot_flops.py
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_vae.py throughput --presets 32-tt-128 --batch 8 --steps 3
	$(BIN)/python bench/bench_dit.py --preset S --batch 8
	@test -f $(VAE_M) && $(BIN)/python bench/bench_vae.py recon --vae $(S)/vae/$(RUN) --features $(S)/features/$(RUN) \
		|| echo "(make train-vae first for the reconstruction-quality benchmark)"

clean-demo: ## delete the demo's artifacts (shards/*/demo*)
	rm -rf $(S)/*/demo $(S)/*/demo-unguided $(S)/samples/demo-seed* $(S)/samples/demo-unguided-seed* \
		$(S)/fid/.ran-demo
