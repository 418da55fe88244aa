# `make demo` and `make test` work on a fresh clone: each creates .venv and installs requirements first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	PYTHON=$(PY) bash shell/run-demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf results demo_data .pytest_cache
