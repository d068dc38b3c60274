# make demo: set up, compile the bundled model for this machine, generate text.
# make test: install what the tests need (apt and pip), run the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages: the arm64 cross compiler (compile --target arm64), qemu-user (run --emulate), and for WebGPU
# emscripten (the wasm runtime and host module), Chromium and Node.js/npm (run --browser, playwright-core).
APT_PACKAGES := g++-aarch64-linux-gnu qemu-user-static emscripten chromium
NODE_PACKAGES := nodejs npm# only where node is missing: images with NodeSource's nodejs already carry npm
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ART  ?= out/demo

.PHONY: demo test test-fast sysdeps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.deps

sysdeps:
	@(for c in aarch64-linux-gnu-g++ qemu-aarch64-static emcc chromium node npm; do \
	    command -v $$c >/dev/null || exit 1; done) || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(APT_PACKAGES) \
	      $$(command -v node >/dev/null || echo $(NODE_PACKAGES)); }

demo: $(VENV)/.deps
	$(BIN)/llamac compile --quant q4 -o $(ART) --force
	$(BIN)/llamac run $(ART) -p "And God said" -n 48

test: sysdeps $(VENV)/.test-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra

# Everything but the tests marked slow.
test-fast: sysdeps $(VENV)/.test-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
