# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

CORE_STAMP := $(VENV)/.installed-core

.PHONY: test demo venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e ".[test]"
	# The DINOv2 torch-hub reference code; its declared dependencies pin old torch/xformers.
	$(PY) -m pip install --quiet --no-deps "dinov2==0.0.1.dev2"
	# nnU-Net's predictor, the reference for imported networks; dynamic-network-architectures pins timm<1.0.23.
	$(PY) -m pip install --quiet --no-deps "nnunetv2==2.8.1" "acvl-utils==0.2.6" \
	  "dynamic-network-architectures==0.4.4" "batchgenerators==0.25.5"
	touch $(STAMP)

$(CORE_STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e .
	touch $(CORE_STAMP)

venv: $(STAMP)

# The benchmark end to end on synthetic APTOS-layout data; needs only the core install.
demo: $(CORE_STAMP)
	$(VENV)/bin/mfjax demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo_out
