# The two commands of README.md: `make bench` (the main job) and `make test`. Each sets itself up from nothing
# (tools/setup_env.sh) and is idempotent. `make gpu-check` is the one command for a lent GPU machine.
SHELL := /bin/bash
PY := $$(cat .dlcore-python)
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test bench bench-quick bench-pytest gpu-check info clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m dlcore.cli bench $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m dlcore.cli bench --quick $(BENCH_ARGS)

info: setup
	$(PY) -m dlcore.cli info

gpu-check:
	@bash tools/gpu_check.sh

clean:
	rm -rf build *.egg-info dlcore/*.so .dlcore-python .pytest_cache

bench-pytest: setup
	$(PY) -m pytest benchmarks/ -p no:cacheprovider
