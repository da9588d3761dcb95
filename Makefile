# Two commands on a fresh machine: `make run` and `make test`. Everything else is installed on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/marketplace
PYTEST_WORKERS ?= 3

.PHONY: install run demo test fuzz-wide check lint schema migrations-check contracts contracts-check typecheck clean bench \
	browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e ".[dev]"
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed

# Headless Chromium and its driver from Debian, for the admin's browser test (tests/browser); needs root.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# Recompile the Solidity contracts into the committed artifacts (escrow/contracts/build/).
contracts: node_modules/.installed
	node escrow/contracts/compile.js

# Fails when the committed artifacts are not what the sources compile to.
contracts-check: node_modules/.installed
	node escrow/contracts/compile.js --check

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(VENV)/bin/honcho start -f Procfile.dev

# Against the running `make run` stack (another terminal): the money path as two agents play it, step by step.
demo: install
	$(PY) manage.py demo

# The whole suite, schemathesis and the fault suite included (`-m ""` lifts pyproject's default of leaving those
# two out of a bare `pytest`, for quick local runs). Worksteal: a worker done with its share takes tests from
# another's, and each share starts with its slow tests (tests/conftest.py, `slow_first`).
test: install
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} \
		$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q -m "" $(PYTEST_ARGS)

# Long schemathesis runs, one per seed, with the coverage phase: FUZZ_WIDE_EXAMPLES per operation and
# FUZZ_WIDE_SCENARIOS stateful scenarios per principal; each run's time limit grows with them (tests/fuzz).
# Every run ends with `reconcile` and the books check.
FUZZ_WIDE_SEEDS ?= 1 2 3
FUZZ_WIDE_EXAMPLES ?= 60
FUZZ_WIDE_SCENARIOS ?= 300
fuzz-wide: install
	for seed in $(FUZZ_WIDE_SEEDS); do \
		DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} FUZZ_SEED=$$seed FUZZ_COVERAGE=1 \
		FUZZ_MAX_EXAMPLES=$(FUZZ_WIDE_EXAMPLES) FUZZ_SCENARIOS=$(FUZZ_WIDE_SCENARIOS) \
		$(PY) -m pytest -q -p no:cacheprovider -m fuzz tests/fuzz $(PYTEST_ARGS) || exit 1; \
	done

# Fails when the committed OpenAPI description would change or warn.
schema: install
	$(PY) manage.py spectacular --validate --fail-on-warn --file var/openapi.yaml

migrations-check: install
	DATABASE_URL=sqlite://:memory: $(PY) manage.py makemigrations --check --dry-run

# ruff, and the import contracts in pyproject.toml (the apps' layers; the SDK imports no Django).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The SDK ships typed (sdk/py.typed); its mypy configuration is in sdk/pyproject.toml.
typecheck: install
	$(VENV)/bin/mypy sdk/

check: lint schema migrations-check contracts-check typecheck

# Every benchmark once with small sizes (a few minutes in all; each script's docstring gives its full-size run).
# Needs PostgreSQL on 127.0.0.1:5432 (databases named *bench*, created when missing) and Redis for the relayer.
bench: install
	$(PY) bench/catalog_search.py --services 5000 --requests 50
	$(PY) bench/proxy.py --seconds 2 --rounds 1 --clients 1,8
	$(PY) bench/proxy_cpu.py --calls 200 --blocks 2
	$(PY) bench/usage.py --seconds 2 --agreements 10
	$(PY) bench/relayer.py --activations 20
	$(PY) bench/load.py --duration 10 --services 100
	$(PY) bench/gas.py
	$(PY) bench/proxy_event_loop.py --seconds 2 --rounds 1

clean:
	rm -rf $(VENV) var node_modules
