# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs everything it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint typecheck unit clean frontend-deps browser-deps js-test vendor-supabase-js

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The page's supabase-js is shipped in examples/frontend/vendor: no npm for the demo.
demo: $(STAMP)
	$(VENV)/bin/llm-relay demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The browser tests need Debian's chromium and the frontend's npm packages (CI runs
# as root on a fresh machine: install them when missing, never a downloaded browser).
FRONTEND := examples/frontend

# The browser tests' harness loads supabase-js from the frontend's node_modules (no CDN).
frontend-deps:
	@command -v npm >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	@[ -d $(FRONTEND)/node_modules ] || (cd $(FRONTEND) && npm ci --no-audit --no-fund)

browser-deps: frontend-deps
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# After changing the pinned supabase-js in examples/frontend/package.json: refresh the
# bundle the demo page ships (a test checks it equals node_modules' copy).
vendor-supabase-js: frontend-deps
	cp $(FRONTEND)/node_modules/@supabase/supabase-js/dist/umd/supabase.js $(FRONTEND)/vendor/

js-test: browser-deps
	node --test $(FRONTEND)/test/

test: lint typecheck js-test
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
