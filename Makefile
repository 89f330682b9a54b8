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

test: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VPY) benchmarks/input_pipeline.py
	$(VPY) benchmarks/train_throughput.py
	$(VPY) benchmarks/dtw.py

clean:
	rm -rf runs
