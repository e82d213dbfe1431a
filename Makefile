# Two commands do all set-up:  `make train` (main job on the built-in dataset) and `make test`.
# A fresh virtual environment is made in .venv. If the system Python already has torch, the venv
# sees it (--system-site-packages) and it is never replaced; otherwise the CPU wheel torch==2.13.0
# is installed, never an unpinned (CUDA, multi-GB) torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the system's torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q torch==2.13.0; \
	fi
	$(VENV)/bin/pip install -q -e ".[test]"
	@touch $@

train: setup
	$(VENV)/bin/dar train --run-dir runs/fmnist

test: setup
	$(PY) -m pytest -q; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

clean:
	rm -rf $(VENV) runs
