# OpenTSU quick start: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opentsu-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py software/_kernel.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --editable '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opentsu demo

test: $(STAMP)
	PYTHONWARNINGS=error $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build out software/*.so *.egg-info
