# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the project if needed.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m cellssl_jax.demo --workdir runs/demo

# Two pytest worker processes (pytest-xdist): much of the suite is XLA compilation, one core each, so two workers
# share the 2-core CI machine better than one process (390 tests: 10.5 min against 15.5; 477 tests with two, and
# conftest.py's LLVM -O0 and compilation cache: 11.2 min on a fresh clone; BENCHMARKS.md, "Test suite").
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(VPY) benchmarks/input_pipeline.py
	$(VPY) benchmarks/train_throughput.py
	$(VPY) benchmarks/dtw.py

clean:
	rm -rf runs
