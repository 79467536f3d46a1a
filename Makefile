# Two user-facing targets: `make demo` and `make test`. Each creates .venv when
# missing and installs the project into it (again when setup.cfg, setup.py or the C source of
# the mask paster changed: the editable install compiles it in place).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNS := runs
DEMO := $(RUNS)/demo
DEMO_WORKERS ?= 2

.PHONY: demo demo-export test lint format install clean-demo

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml official_maskrcnn/evaluation/_mask_rle.c
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' \
	  || { echo "Set PYTHON=/path/to/python3.11 (found $$($(PYTHON) --version))" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/flake8 official_maskrcnn tfrecord_tools tests benchmarks
	$(VENV)/bin/isort --check-only --diff official_maskrcnn tfrecord_tools tests benchmarks

format: $(STAMP)
	$(VENV)/bin/isort official_maskrcnn tfrecord_tools tests benchmarks
	$(VENV)/bin/yapf --in-place --recursive official_maskrcnn tfrecord_tools tests benchmarks

# The demo on the embedded synthetic data: generate -> convert -> verify -> train from scratch
# (COCO evaluation every epoch) -> evaluate the last checkpoint -> draw predictions.
demo: $(STAMP)
	$(PY) -m tfrecord_tools.make_synthetic_coco --output_dir $(DEMO)/coco --split train --num_images 256 --image_size 128 --seed 1
	$(PY) -m tfrecord_tools.make_synthetic_coco --output_dir $(DEMO)/coco --split val --num_images 64 --image_size 128 --seed 2
	$(PY) -m tfrecord_tools.create_coco_tfrecord --image_dir $(DEMO)/coco/train \
	  --annotations_file $(DEMO)/coco/annotations/instances_train.json \
	  --output_prefix $(DEMO)/tfrecords/train --num_shards 4 --num_workers $(DEMO_WORKERS)
	$(PY) -m tfrecord_tools.create_coco_tfrecord --image_dir $(DEMO)/coco/val \
	  --annotations_file $(DEMO)/coco/annotations/instances_val.json \
	  --output_prefix $(DEMO)/tfrecords/val --num_shards 2 --num_workers $(DEMO_WORKERS)
	$(PY) -m tfrecord_tools.verify_tfrecord --file_pattern '$(DEMO)/tfrecords/train-*' \
	  --annotations_file $(DEMO)/coco/annotations/instances_train.json
	$(PY) -m tfrecord_tools.verify_tfrecord --file_pattern '$(DEMO)/tfrecords/val-*' \
	  --annotations_file $(DEMO)/coco/annotations/instances_val.json
	rm -rf $(DEMO)/model
	$(PY) -m official_maskrcnn.train --gin_file configs/demo.gin --model_dir $(DEMO)/model
	$(PY) -m official_maskrcnn.evaluate --gin_file configs/demo.gin --model_dir $(DEMO)/model
	$(PY) -m official_maskrcnn.predict --gin_file configs/demo.gin --checkpoint $(DEMO)/model \
	  --output_dir $(DEMO)/predictions $$(ls $(DEMO)/coco/val/*.jpg | head -6)
	@echo "Demo outputs are under $(DEMO)/: COCO data in coco/, records in tfrecords/, the run in"
	@echo "model/ (checkpoints, metrics.jsonl: mAP per epoch, mlperf.log, eval-*.json, TensorBoard),"
	@echo "pictures of val predictions in predictions/."

# After `make demo`: its model as a SavedModel (image bytes in, masks in original pixels out),
# served on the same val pictures by `predict --saved_model` (no checkpoint, no config).
demo-export: $(STAMP)
	$(PY) -m official_maskrcnn.export --gin_file configs/demo.gin --checkpoint $(DEMO)/model \
	  --export_dir $(DEMO)/export --overwrite
	$(PY) -m official_maskrcnn.predict --saved_model $(DEMO)/export \
	  --output_dir $(DEMO)/served $$(ls $(DEMO)/coco/val/*.jpg | head -6)
	@echo "The SavedModel is in $(DEMO)/export/, its pictures of the val images in $(DEMO)/served/."

clean-demo:
	rm -rf $(DEMO)
