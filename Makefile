# dorm — every target bootstraps its own virtualenv in .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-cgroup2 vm-packages lint bench bench-proxy bench-sandbox bench-coldstart \
	bench-runner bench-locust \
	bench-registry clean

# The compiled sources too: an editable install builds them in place (setup.py), and a build
# older than its source would shadow it.
$(STAMP): pyproject.toml setup.py gateway/_heads.c gateway/proxy.py gateway/upstream.py \
	gateway/instance.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) -m gateway.demo

test: $(STAMP) vm-packages
	$(PY) -m pytest $(PYTEST_ARGS)

# The cgroup v2 guest (tests/vm): qemu-system-x86, busybox-static and a Debian kernel, installed
# when root on x86_64 (a no-op once there; never fails: the guest test skips saying what is missing).
vm-packages:
	@bash tests/vm/install-packages.sh

# Only the cgroup v2 guest: boots it and runs the v2 tests inside (CGROUP2_ARGS: pytest args for
# the inner run, e.g. CGROUP2_ARGS=tests/sandboxes for the whole sandbox suite under v2).
test-cgroup2: $(STAMP) vm-packages
	$(PY) -m tests.vm.guest $(CGROUP2_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark; each rewrites its own section of docs/benchmarks.md. BENCH_ARGS=--quick for a
# laptop-sized run.
bench: bench-proxy bench-sandbox bench-coldstart bench-runner bench-locust bench-registry

bench-proxy: $(BENCH_STAMP)
	bash bench/install-baselines.sh
	$(PY) -m bench.proxy $(BENCH_ARGS)

bench-sandbox: $(BENCH_STAMP)
	bash bench/install-baselines.sh
	$(PY) -m bench.sandbox --write $(BENCH_ARGS)

bench-coldstart: $(BENCH_STAMP)
	$(PY) -m bench.coldstart $(BENCH_ARGS)

bench-runner: $(BENCH_STAMP)
	$(PY) -m bench.runner $(BENCH_ARGS)

bench-locust: $(BENCH_STAMP)
	$(PY) -m bench.locust_run all $(BENCH_ARGS)

# 100,000 apps registered through the admin API (10,000 with --quick): gateway RSS, restart time.
bench-registry: $(BENCH_STAMP)
	$(PY) -m bench.registry_scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
