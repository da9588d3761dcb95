# Two commands on a fresh machine: `make run` and `make test`. Everything else is installed on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/marketplace
PYTEST_WORKERS ?= 2

.PHONY: install run test check schema migrations-check demo clean bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(VENV)/bin/honcho start -f Procfile.dev

test: install
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} \
		$(PY) -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS)

# Fails when the committed OpenAPI description would change or warn.
schema: install
	$(PY) manage.py spectacular --validate --fail-on-warn --file var/openapi.yaml

migrations-check: install
	$(PY) manage.py makemigrations --check --dry-run

check: schema migrations-check

clean:
	rm -rf $(VENV) var node_modules
