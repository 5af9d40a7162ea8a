# fasterkd: two commands do everything on a fresh machine.
#   make book   create .venv, install, fetch the book's browser assets, run the notebooks, build the book
#   make test   the same set-up plus headless Chromium, then the test suite
# Options: make book PROFILE=quick|smoke|study|paper DATA=/path/to/cityscapes DEVICE=auto|cpu|cuda
#          make book FORCE=1 (re-run every notebook), make book ONLY=06_fa_histograms,
#          make book DRY=1 (list what would run)
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= quick
DATA    ?=
DEVICE  ?= auto
RUN     ?= runs/book-$(PROFILE)
ONLY    ?=
FORCE   ?=
DRY     ?=
STAMPS  := .stamps
VENDOR  := book/_vendor
NPM_DIR := $(STAMPS)/npm

# Browser assets served by the book itself (no CDN at view time), pinned.
HTML_MANAGER := @jupyter-widgets/html-manager@1.0.15
REQUIREJS    := requirejs@2.3.8
MATHJAX      := mathjax@3.2.2

.PHONY: help book test test-fast venv assets browser clean distclean
help:
	@echo "make book [PROFILE=quick|smoke|study|paper] [DATA=/path/to/cityscapes] [DEVICE=auto|cpu|cuda] [FORCE=1] [ONLY=name] [DRY=1]"
	@echo "make test      everything incl. notebooks (smoke), the book build and headless Chromium"
	@echo "make test-fast unit tests only (-m 'not slow')"

# --- Python environment: rebuilt when pyproject.toml changes --------------------------------
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PYTHON) -m venv' failed: Python >= 3.10 with venv is needed (Debian: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[book,test]"
	@touch $@

venv: $(STAMPS)/venv

# Triton for the FA kernel tests (run on CPU under its interpreter): a heavy extra, only for `make test`
$(STAMPS)/triton: $(STAMPS)/venv
	$(PY) -m pip install --quiet -e ".[triton]"
	@touch $@

# --- MathJax, require.js and the ipywidgets HTML manager from the npm registry --------------
# Unpacked into book/_vendor (gitignored), NOT book/_static: Jupyter Book 1 injects every
# .js/.css under _static into every page, which loaded the widget manager twice.
$(STAMPS)/assets: Makefile
	@command -v npm >/dev/null || { echo "npm is needed to fetch the book's browser assets (apt-get install npm)"; exit 1; }
	rm -rf $(NPM_DIR) $(VENDOR)
	mkdir -p $(NPM_DIR) $(VENDOR)/widgets $(VENDOR)/mathjax
	cd $(NPM_DIR) && npm pack --silent $(HTML_MANAGER) $(REQUIREJS) $(MATHJAX) >/dev/null
	cd $(NPM_DIR) && for t in *.tgz; do d=$${t%.tgz}; mkdir -p $$d && tar -xzf $$t -C $$d; done
	cp $(NPM_DIR)/jupyter-widgets-html-manager-*/package/dist/embed-amd.js $(VENDOR)/widgets/
	cp $(NPM_DIR)/jupyter-widgets-html-manager-*/package/dist/*.woff* $(VENDOR)/widgets/ 2>/dev/null || true
	cp $(NPM_DIR)/requirejs-*/package/require.js $(VENDOR)/widgets/
	# MathJax: the combined TeX+MathML/CHTML component and the folders it loads from at view
	# time (TeX extensions, CHTML fonts, menu, accessibility); the other builds are not needed
	cp $(NPM_DIR)/mathjax-*/package/es5/tex-mml-chtml.js $(VENDOR)/mathjax/
	cd $(NPM_DIR)/mathjax-*/package/es5 && cp -r input output a11y ui sre adaptors $(CURDIR)/$(VENDOR)/mathjax/
	rm -rf $(NPM_DIR)
	@touch $@

assets: $(STAMPS)/assets

# --- Headless Chromium for the browser tests (Debian packages; CI runs as root) ------------
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver present"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

# --- The book --------------------------------------------------------------------------------
book: $(STAMPS)/venv $(STAMPS)/assets
	$(PY) -m fasterkd.book --profile $(PROFILE) --run-dir $(RUN) --data-root "$(DATA)" --device $(DEVICE) \
	  $(if $(ONLY),--only $(ONLY)) $(if $(FORCE),--force) $(if $(DRY),--dry-run)

# --- Tests: FASTERKD_MAKE_TEST=1 tells the browser test that Chromium must be there ----------
test: $(STAMPS)/venv $(STAMPS)/triton $(STAMPS)/assets browser
	FASTERKD_MAKE_TEST=1 $(PY) -m pytest -q -rs --durations=15

test-fast: $(STAMPS)/venv
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs/book-*/_build runs/book-*/book _build book/executed

distclean: clean
	rm -rf $(VENV) $(STAMPS) $(VENDOR) runs
