# The README's commands call these targets; .ci/run runs `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=
BENCH_JSON ?= bench-results.json

.PHONY: install dev test lint fmt rust-test pytest bench bench-quick

install:
	$(PYTHON) -m pip install --quiet '.[test]'
	@# tests/test_logrotate_e2e.py runs Debian's logrotate and tests/test_sessions.py
	@# traces `sigil sessions` with strace (neither is ever skipped).
	command -v logrotate >/dev/null || test -x /usr/sbin/logrotate || \
		{ apt-get update -q && apt-get install -y -q logrotate; }
	command -v strace >/dev/null || { apt-get update -q && apt-get install -y -q strace; }

# An editable build into the active virtualenv, for working on the code:
# Python changes apply at once; after a Rust change, run it again.
dev:
	$(PYTHON) -m pip install --quiet 'maturin>=1.9,<2'
	$(PYTHON) -m maturin develop --release --extras test

# Needs the extension installed (`make install` or `make dev`): stubtest
# imports it to check _native.pyi against it.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests benches scripts
	$(PYTHON) -m ruff format --check python tests benches scripts
	$(PYTHON) -m mypy python/sigil
	$(PYTHON) -m mypy.stubtest sigil._native

fmt:
	cargo fmt
	$(PYTHON) -m ruff check --fix python tests benches scripts
	$(PYTHON) -m ruff format python tests benches scripts

rust-test:
	cargo test

pytest:
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# Quick mode: few rounds, still checked against the spec's limits.
bench-quick:
	SIGIL_BENCH_QUICK=1 $(PYTHON) -m pytest benches -q -p no:cacheprovider \
		--benchmark-only --benchmark-warmup=off --benchmark-min-rounds=1 \
		--benchmark-max-time=0.2 --benchmark-json=$(BENCH_JSON)
	$(PYTHON) scripts/check_bench.py $(BENCH_JSON)

bench:
	$(PYTHON) -m pytest benches -q --benchmark-only --benchmark-json=$(BENCH_JSON)
	$(PYTHON) scripts/check_bench.py $(BENCH_JSON)

# Everything CI checks, in order: the Python install with test extras (lint
# imports the extension); lints; Rust tests; pytest; benchmarks in quick mode.
test:
	$(MAKE) install
	$(MAKE) lint
	cargo test
	$(MAKE) pytest
	$(MAKE) bench-quick
