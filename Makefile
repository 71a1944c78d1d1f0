# supervise: every target works on a fresh machine (it installs what it needs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8000

.PHONY: install demo test test-fast soak bench bench-quick image image-demo docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: the demo app under supervise (no Consul needed).
demo: install
	@echo "supervise demo: http://127.0.0.1:$(PORT)/  (health: http://127.0.0.1:$$(($(PORT)+1))/health)"
	@echo "  reload:  edit examples/hello/app.py, or: kill -HUP <master pid>     stop: Ctrl-C"
	$(VENV)/bin/supervise app --chdir examples/hello --bind 127.0.0.1:$(PORT) \
		--health-bind 127.0.0.1:$$(($(PORT)+1)) --workers 2 --log-format console

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
# bench/setup.sh); writes docs/benchmarks.md (~12 min).
bench: install
	bash bench/setup.sh
	$(PY) bench/run.py $(BENCH_ARGS)

# A short smoke run; results go to bench/results/, docs are left alone.
bench-quick: install
	bash bench/setup.sh
	$(PY) bench/run.py --quick $(BENCH_ARGS)

image:
	bash scripts/image.sh build

image-demo:
	bash scripts/image.sh demo

docs: install
	$(PY) -m supervisor.settings > docs/configuration.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
