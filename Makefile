# homescale: the two commands of the contract are `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
SERVER_URL ?= http://127.0.0.1:8080

.PHONY: run test bench bench-scale fuzz lint sysdeps binary deb clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "python venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,build]'
	touch $(STAMP)

# CI requires every test tier (tests/tiers.py): with HOMESCALE_REQUIRE_ALL=1 a
# set-up script that cannot set its tier up, or a test whose tier is missing,
# fails instead of skipping. .ci/run sets it; so does any CI that sets CI=true.
ifeq ($(CI),true)
export HOMESCALE_REQUIRE_ALL ?= 1
endif

# Debian tools the test suite drives (network namespaces, packaging). Installed
# only when missing and only as root; otherwise the tests that need them skip
# with the reason (fail under HOMESCALE_REQUIRE_ALL=1).
sysdeps:
	@packaging/sysdeps.sh

run: $(STAMP)
	@test -f $(DATA)/config.yaml || $(BIN)/homescale init --data-dir $(DATA) --server-url $(SERVER_URL)
	$(BIN)/homescale -c $(DATA)/config.yaml serve

# Format, lint and type checks: seconds, no set-up; `make test` runs them first. The venv
# is built when missing, never rebuilt just for a lint run (pyproject.toml newer than it).
LINTED := appliance protocol netmap derp tests packaging
lint: $(if $(wildcard $(STAMP)),,$(STAMP))
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy appliance protocol netmap derp tests

test: $(STAMP) lint sysdeps
	PIP=$(BIN)/pip tests/fetch-realclient.sh
	tests/idp/setup.sh
	packaging/prepare-testroot.sh
	tests/in-netns.sh $(BIN)/python -m pytest -q tests

# Long fuzzing: every target in tests/fuzz for FUZZ_MINUTES minutes each (default 5,
# capped at 120 by tests/fuzz/harness.py); failures land in tests/fuzz/corpus/<target>/.
FUZZ_MINUTES ?= 5
fuzz: $(STAMP)
	HOMESCALE_FUZZ_MINUTES=$(FUZZ_MINUTES) nice $(BIN)/python -m pytest -q -s tests/fuzz -k 'not corpus'

bench: $(STAMP)
	$(BIN)/python -m tests.bench

# A real server under N simulated nodes over the real wire (tests/loadgen); one
# line of figures per phase. Loopback only; every phase bounded.
N ?= 200
# Issue 10's load: 32 joins in flight per worker, 50 endpoint changes/s for 60 s.
SCALE ?= --concurrency 32 --idle 20 --rate 50 --seconds 60 --phase-timeout 900
bench-scale: $(STAMP)
	$(BIN)/python -m tests.loadgen -n $(N) $(SCALE)

binary: $(STAMP)
	packaging/build-binary.sh

deb: binary
	packaging/build-deb.sh

clean:
	rm -rf build dist *.egg-info
