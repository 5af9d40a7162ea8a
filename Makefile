# fasterkd: two commands do everything on a fresh machine.
#   make book   create .venv, install, fetch the book's browser assets, run the notebooks, build the book
#   make test   the same set-up plus headless Chromium, then the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROFILE ?= quick
DATA   ?=
DEVICE ?= auto
RUN    ?= runs/book-$(PROFILE)
STAMPS := .stamps

.PHONY: book test venv assets browser clean help
help:
	@echo "make book [PROFILE=quick|smoke|paper] [DATA=/path/to/cityscapes] [DEVICE=auto|cpu|cuda]"
	@echo "make test"

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[book,test]"
	@touch $@

venv: $(STAMPS)/venv

test: $(STAMPS)/venv
	$(PY) -m pytest -q
