# hf-rwsam: `make test` and `make demo` build .venv from this repository's own files, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes from the package registry in its standard build (it runs on CPU too); see setup.cfg.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv test test-fast demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e ".[test,examples,experiments,trl]"
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The suite without the tests marked slow or distributed (setup.cfg): a few minutes, for the edit-test loop.
test-fast: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow and not distributed" tests

# The main job on the embedded default dataset: the small CNN on scikit-learn's digits, 40% symmetric label noise,
# RW-SAM, offline on CPU; everything lands in outputs/demo/.
demo: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) examples/train_image_classification.py examples/configs/demo_digits.yaml

clean:
	rm -rf $(VENV) build *.egg-info outputs
