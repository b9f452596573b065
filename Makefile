# gpu-tasks: `make run` starts a local deployment (embedded Redis, 4 sim GPUs unless
# real ones are found, Flower) and runs the demo; `make test` is what CI runs.
#
#   make run                  # stay up until Ctrl-C
#   make run ARGS=--once      # exit after the demo (0 if it passed)
#   make test PYTEST_ARGS='-k routing -x'
#   make test-fast            # pytest alone, without the tests marked slow (about 2 minutes)

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
EXTRAS      ?= worker,ops,dev
# One stamp per set of extras: `make run EXTRAS=worker,ops,dev,cuda` syncs again.
STAMP       := $(VENV)/.installed-$(EXTRAS)
# uv, pinned, in a tools folder of its own: it installs .venv from uv.lock.
UV_VERSION  := 0.13.9
TOOLS       := .venv-tools
UV_STAMP    := $(TOOLS)/.uv-$(UV_VERSION)
UV          := UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never $(TOOLS)/bin/uv
comma       := ,
UV_EXTRAS   := $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra))
ARGS        ?=
CHAOS_ARGS  ?=
PYTEST_ARGS ?=
# pytest-xdist processes. Many tests wait on workers, Redis and faults rather than compute, so
# more processes than cores pay: on 2 cores 4 did best for make test (its long fault tests
# mostly wait) and 3 for make test-fast (README, "Tests"). Each process has its own Redis,
# cluster and port range; --dist loadfile keeps a module's tests (and its module-scoped
# clusters) in one process, in the order tests/conftest.py gives (longest first).
PYTEST_WORKERS      ?= 4
PYTEST_FAST_WORKERS ?= 3
XDIST = --dist loadfile --no-loadscope-reorder

.DEFAULT_GOAL := help
.PHONY: help venv install tools lock run test test-fast lint typecheck bench chaos clean distclean

help:
	@echo "make run [ARGS=--once]   start Redis, GPU workers, Flower and run the demo (gpu-tasks up)"
	@echo "make test [PYTEST_ARGS=] ruff, mypy and pytest, in parallel (what CI runs)"
	@echo "make test-fast           pytest without the tests marked slow, in parallel (no lint)"
	@echo "make lint | typecheck    ruff check | mypy alone"
	@echo "make bench [BENCH_ARGS=] router, drain and end-to-end benchmarks; rewrites BENCHMARKS.md"
	@echo "make chaos [CHAOS_ARGS=] fuzzing (10,000 cases) and faults; writes BENCHMARKS.md's Reliability"
	@echo "make venv                create $(VENV) and install the project into it from uv.lock"
	@echo "make lock                move uv.lock to the newest versions pyproject.toml allows"
	@echo "make clean | distclean   remove run data and caches | also $(VENV), $(TOOLS) and .dist"

venv install: $(STAMP)

# uv alone (ops/fetch-gpu-dist uses it to read uv.lock).
tools: $(UV_STAMP)

$(UV_STAMP):
	rm -rf $(TOOLS)
	PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--target $(TOOLS) 'uv==$(UV_VERSION)'
	@touch $@

# Install exactly what uv.lock holds (the project itself editable); again only when the
# lock or pyproject.toml changed. A pyproject.toml the lock no longer matches stops here.
# --compile-bytecode, as pip does by default: where PYTHONDONTWRITEBYTECODE is set (CI
# images often set it), every worker, CLI and test process would otherwise compile Celery,
# kombu, redis-py and numpy from source at each start (make test: 12.7 min of CPU, not 7.8).
$(STAMP): pyproject.toml uv.lock | $(UV_STAMP)
	@$(UV) lock --check --offline --quiet >/dev/null 2>&1 || { echo "uv.lock does not \
	match pyproject.toml: run 'make lock' (or '$(TOOLS)/bin/uv lock'), then 'make test', \
	and commit uv.lock" >&2; exit 1; }
	$(UV) sync --locked --quiet --compile-bytecode --python $(PYTHON) $(UV_EXTRAS)
	@rm -f $(VENV)/.installed*
	@touch $@

# Every dependency to the newest version pyproject.toml allows (needs PyPI).
lock: | $(UV_STAMP)
	$(UV) lock --upgrade

run: $(STAMP)
	$(VENV)/bin/gpu-tasks up $(ARGS)

test: lint typecheck
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_FAST_WORKERS) $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check gpu_tasks workers tests benchmarks examples ops

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks.report --output BENCHMARKS.md $(BENCH_ARGS)

# About 15 minutes on 2 cores; CHAOS_ARGS=--no-long-outage leaves out the 60 s Redis outage,
# CHAOS_ARGS='--only redis-blip' runs one part (its figures replace the whole section).
chaos: $(STAMP)
	$(PY) -m benchmarks.chaos --output BENCHMARKS.md $(CHAOS_ARGS)

clean:
	rm -rf .gpu-tasks .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(TOOLS) .dist
