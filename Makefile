# supervise: every target works on a fresh Debian machine once the README's apt-get line has run
# (scripts/lib/prereqs.sh checks it and says what to install); the rest installs itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8000
HEALTH_PORT ?= $(shell expr $(PORT) + 1)

.PHONY: check-prereqs install demo test test-fast soak bench bench-quick bench-heavy image image-demo docs clean

# make, python3 >= 3.11 with venv/ensurepip, procps: one line naming the apt-get command if not.
check-prereqs:
	@PYTHON='$(PYTHON)' bash scripts/lib/prereqs.sh check

$(VENV)/.installed: pyproject.toml | check-prereqs
	@echo "install: $(VENV) with supervise and its test dependencies (first time: about a minute)"
	@t0=$$(date +%s) && $(PYTHON) -m venv $(VENV) \
		&& $(PY) -m pip install -q --upgrade pip \
		&& $(PY) -m pip install -q -e '.[test]' \
		&& echo "install: done in $$(( $$(date +%s) - t0 )) s"
	@touch $@

install: check-prereqs $(VENV)/.installed

# The main job: the demo app under supervise (no Consul needed). PORT=9000 make demo (or
# make demo PORT=9000) serves on 9000, health on PORT+1 (HEALTH_PORT= to choose it).
demo: install
	@echo "supervise demo: http://127.0.0.1:$(PORT)/  (health: http://127.0.0.1:$(HEALTH_PORT)/health)"; \
	echo "  reload:  edit examples/hello/app.py, or: kill -HUP $$$$     stop: Ctrl-C"; \
	exec $(VENV)/bin/supervise app --chdir examples/hello --bind 127.0.0.1:$(PORT) \
		--health-bind 127.0.0.1:$(HEALTH_PORT) --workers 2 --log-format console

# The whole suite: unit, HTTP, lifecycle, PID 1, reload, watcher, Consul (real agent) and
# Docker (real engine) tests.
test: install
	$(PY) -m pytest -q -ra

# Everything but the Docker, Consul and HAProxy end-to-end tests.
test-fast: install
	$(PY) -m pytest -q -ra -m "not docker and not consul and not haproxy"

# Every hostile client and careless operator of tests/test_hostile.py at once, under load, against
# one supervise (loopback only; SOAK_ARGS="--duration 300" for longer): 0 failed requests expected.
soak: install
	$(PY) -m tests.soak $(SOAK_ARGS)

# Side by side with gunicorn (sync, gthread), uWSGI and Granian (installed into .venv-bench by
# bench/setup.sh); writes docs/benchmarks.md (~12 min), then appends the heavy-app table
# (--preload against gunicorn --preload and uWSGI, ~2 min).
bench: install
	bash bench/setup.sh
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/heavy.py --append docs/benchmarks.md

# Only the heavy-app table (preload that still reloads), printed.
bench-heavy: install
	bash bench/setup.sh
	$(PY) bench/heavy.py

# A short smoke run; results go to bench/results/, docs are left alone.
bench-quick: install
	bash bench/setup.sh
	$(PY) bench/run.py --quick $(BENCH_ARGS)

# The container image (engine, base image, wheelhouse: each step printed with its time; the
# wheelhouse is built with the venv's pip).
image: install
	bash scripts/image.sh build

image-demo: install
	bash scripts/image.sh demo

docs: install
	$(PY) -m supervisor.settings > docs/configuration.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The fleet demo (make fleet-demo, fleet-down, fleet-status) and its tests (make test-fleet).
include fleet.mk
