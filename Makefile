# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv from requirements.txt when it is missing (or older than requirements.txt).

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed

.PHONY: demo test clean-demo

$(STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) demo.py

test: $(STAMP)
	$(PYTHON) -m pytest

clean-demo:
	rm -rf runs/demo
