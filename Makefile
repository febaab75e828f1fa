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
	$(PIP_INSTALL) -e ".[test,examples]"
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

demo: venv
	@echo "make demo arrives with the example scripts (see the issue tracker); run 'make test' meanwhile."

clean:
	rm -rf $(VENV) build *.egg-info outputs
