# Set-up and the two README commands. Everything installs from this file and pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build from the local wheel; a GPU cluster overrides it (see README), e.g.
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup relion test demo
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# RELION 3.1 binaries for the agreement tests and Chromium to render the report (Debian packages; root or sudo).
relion:
	@{ command -v relion_reconstruct >/dev/null && command -v chromium >/dev/null; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq relion chromium >/dev/null; } \
	  || echo "WARNING: could not install RELION / Chromium (apt-get install relion chromium): their tests will be skipped"

test: setup relion
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/cryoforum demo --out demo_out
