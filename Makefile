# OpenTSU quick start: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opentsu-installed

.PHONY: demo test install clean verilator

install: $(STAMP)

$(STAMP): pyproject.toml setup.py software/_kernel.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --editable '.[test]'
	touch $(STAMP)

# The demo ends with the iCEBreaker bitstream (yowasp flow, a few minutes); it fails, with the numbers, if the
# design does not fit the UP5K or misses its clock.
demo: $(STAMP) verilator
	$(VENV)/bin/opentsu demo
	$(VENV)/bin/opentsu build --board icebreaker -o out/demo/icebreaker

test: $(STAMP) verilator
	PYTHONWARNINGS=error $(PY) -m pytest -q

# Verilator and a C++ compiler, for `--backend verilator` and its tests: from apt, only when missing.
verilator:
	@command -v verilator >/dev/null && command -v g++ >/dev/null || { \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq verilator g++ make; }

clean:
	rm -rf $(VENV) build out software/*.so *.egg-info
