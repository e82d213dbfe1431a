# Two commands do all set-up: `make train` (main job on the built-in dataset) and `make test`.
# Both make the virtual environment .venv on first use: `make train` installs the package only,
# `make test` also its [test] extras (pytest, triton).
#
# torch. If $(PYTHON) can already import torch, .venv sees it (--system-site-packages) and it is never
# replaced: every later pip install is constrained to exactly the torch .venv sees. Otherwise, when .venv
# is made (`make clean` to redo it), $(TORCH) is installed; two variables choose the build:
#   TORCH_INDEX  extra package index for the torch wheel. Default: PyTorch's CPU index
#                https://download.pytorch.org/whl/cpu, unless `nvidia-smi -L` lists a GPU or the OS is
#                macOS; then empty, i.e. pip's own index (PyPI: the CUDA build on Linux). Any other build:
#                e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126`.
#   TORCH        the requirement. Default: torch==$(TORCH_VERSION)+TAG for an index ending in /TAG (cpu,
#                cu126, rocm6.4, xpu; Linux), else torch==$(TORCH_VERSION). The +cpu build exists only on
#                the CPU index, so pip cannot fall back to the multi-GB CUDA build. If a source pip already
#                knows (find-links, a mirror) holds that exact build, TORCH_INDEX is not contacted at all.
# With the automatic choice on a machine without a GPU, set-up fails if a CUDA torch or any nvidia-* /
# cuda-* package ended up in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

TORCH_VERSION ?= 2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
OS_NAME := $(shell uname -s)
# evaluated once, on first use
GPU = $(eval GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo yes))$(GPU)
TORCH_INDEX ?= $(if $(GPU)$(filter Darwin,$(OS_NAME)),,$(CPU_INDEX))
TORCH_TAG = $(if $(filter Darwin,$(OS_NAME)),,$(filter cpu cu% rocm% xpu,$(notdir $(patsubst %/,%,$(TORCH_INDEX)))))
TORCH ?= torch==$(TORCH_VERSION)$(if $(TORCH_TAG),+$(TORCH_TAG))
# "yes" when the build is chosen automatically (neither TORCH_INDEX nor TORCH given) and there is no GPU
CPU_ONLY = $(if $(GPU),,$(and $(filter file,$(origin TORCH_INDEX)),$(filter file,$(origin TORCH)),yes))

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

# pins every pip install to the torch .venv sees now, so pip can never replace or add one
PIN_TORCH = $(PY) -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
	> $(VENV)/torch-constraint.txt

# .venv with torch
$(VENV)/.torch:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch $(PYTHON) already has (never replaced)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) || exit 1; \
	else \
		$(PYTHON) -m venv $(VENV) || exit 1; \
		index="$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))"; \
		case "$(TORCH)" in *+*) $(PIP) install --dry-run --no-deps -q "$(TORCH)" >/dev/null 2>&1 && index="";; esac; \
		echo "installing $(TORCH) from pip's configured sources$${index:+ and $(TORCH_INDEX)}"; \
		$(PIP) install $$index "$(TORCH)" || { echo "error: could not install $(TORCH) from" \
			"pip's configured sources$${index:+ or $(TORCH_INDEX)}; see TORCH_INDEX at the Makefile's head" >&2; exit 1; }; \
		if [ -n "$(CPU_ONLY)" ]; then \
			cuda=$$($(PIP) list --local --format=freeze | grep -iE '^(nvidia|cuda)[-_]'); \
			if [ -n "$$cuda" ] || ! $(PY) -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
				echo "error: this machine has no NVIDIA GPU, but CUDA packages were installed into $(VENV):" $$cuda >&2; \
				echo "  remove them (rm -rf $(VENV)) and choose the build: make setup TORCH_INDEX=... TORCH=..." >&2; \
				exit 1; \
			fi; \
		fi; \
	fi
	$(PY) -W ignore -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda)"
	@touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIN_TORCH)
	@$(PIP) install -c $(VENV)/torch-constraint.txt -e . || { echo "error: pip could not install dar" \
		"with the torch in $(VENV) ($$(cat $(VENV)/torch-constraint.txt)), which is never replaced;" \
		"if it is too old, upgrade it yourself or use another PYTHON=..." >&2; exit 1; }
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIN_TORCH)
	$(PIP) install -c $(VENV)/torch-constraint.txt -e ".[test]"
	@touch $@

# resumes from the last checkpoint in runs/fmnist (every 500 steps) when rerun
train: setup
	$(VENV)/bin/dar train --run-dir runs/fmnist

# pytest's exit code 5 (no tests collected) is not a failure
test: $(VENV)/.installed-test
	$(PY) -m pytest -q; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

# residual vs every DAR variant on SiT-Nano/4 (CPU sizes): step time, memory, sampling, FLOPs
bench: setup
	$(VENV)/bin/dar bench --preset cpu --json runs/bench.json

clean:
	rm -rf $(VENV) runs
