# Two entry points: `make demo` and `make test`. Both create/reuse .venv (Python 3.11).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install shellcheck clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,beam]'
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
	$(PY) -m glide_jax.demo --workdir runs/demo --steps 2000

test: $(STAMP) shellcheck
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .jax_cache
