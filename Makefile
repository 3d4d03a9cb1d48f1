# Two entry points (see README): `make demo` and `make test`. Each builds .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WORLD   ?= worlds/tiny
RUN     ?= runs/tiny-native

.PHONY: venv demo test bench study clean

venv: $(VENV)/.installed

# torch goes in first and alone: on CPU machines torch==2.13.0 is the local CPU wheel, and once it
# is there pip will not pull a multi-GB CUDA build to satisfy torchtune or lightning.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/python train.py fit -c configs/scale/tiny.yaml -c configs/fusion/native.yaml \
	    --data.world_dir $(WORLD) --trainer.default_root_dir $(RUN)
	$(BIN)/python eval.py --ckpt $(RUN) --suite world --split test --out $(RUN)/eval

test: venv
	$(BIN)/python -m pytest -q tests

# the study (issue 11): every stage, arm, seed and evaluation, then runs/study-tiny/report.md; resumes
study: venv
	$(BIN)/python -m omnifuse.study run $(or $(STUDY),configs/study/tiny.yaml)

bench: venv
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) worlds runs
