# Two entry points: `make demo` and `make test`. Both create/reuse .venv (Python 3.11).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the suite's files run on this many pytest-xdist workers: 3 on the 2-core CI machine, because
# several tests wait on their subprocesses (docs/benchmarks.md, "Test suite wall time")
TEST_WORKERS ?= 3

.PHONY: demo miniature test install shellcheck clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,beam,tpu]'
	touch $(STAMP)

install: $(STAMP)

# The launch-script lint test runs shellcheck when present: install it where apt-get is available
# (CI runs as root), otherwise say so; the test then skips with the same reason.
shellcheck:
	@command -v shellcheck >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null) || echo "shellcheck: apt-get install failed; its test will be skipped"; \
	  else echo "shellcheck: not installed and no root apt-get; its test will be skipped"; fi; }

demo: $(STAMP)
	$(PY) -m glide_jax.demo --workdir runs/demo

# every GLIDE network trained on shapes, evaluated: runs/miniature/report.md (~1 h on 2 CPU cores, resumable)
miniature: $(STAMP)
	$(PY) -m glide_jax.demo --all --workdir runs/miniature

test: $(STAMP) shellcheck
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) runs .jax_cache
