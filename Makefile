# Every target installs what it needs first (scripts/bootstrap.sh is idempotent).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap lint test test-unit chaos fuzz demo sandbox-down bench-agent bench-heal bench-barrier bench-update bench-failover bench-env bench-rolling bench-control image clean

bootstrap:
	@bash scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check norm tests sandbox bench
	$(VENV)/bin/mypy norm
	$(VENV)/bin/lint-imports
	$(PY) -m norm config reference --check docs/configuration.md

test: lint
	@PYTEST_ARGS='$(PYTEST_ARGS)' bash scripts/test.sh

# Hostile values in every etcd key Norm reads, against a real agent (tests/integration/test_fuzz_etcd.py);
# `make test` runs a fixed slice of it. The last line printed is the campaign's figures, as JSON.
FUZZ_EXAMPLES ?= 10000
fuzz: bootstrap
	@mkdir -p .run && rm -f .run/fuzz.json
	@NORM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) NORM_FUZZ_REPORT=.run/fuzz.json PYTHONASYNCIODEBUG=1 \
		$(VENV)/bin/pytest -q -p no:cacheprovider tests/integration/test_fuzz_etcd.py; \
		status=$$?; cat .run/fuzz.json 2>/dev/null; exit $$status

test-unit: bootstrap
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

# The seeded fault campaign: `make chaos SEEDS=N` runs N random seeds, `make chaos SEED=S` replays one.
SEEDS ?= 5
SEED ?=
CHAOS_ARGS ?=

chaos: bootstrap
	$(PY) -m sandbox.chaos $(if $(SEED),--seed $(SEED),--seeds $(SEEDS)) $(CHAOS_ARGS)

demo: bootstrap
	$(PY) -m sandbox demo

sandbox-down: bootstrap
	$(PY) -m sandbox down

bench-agent: bootstrap
	$(PY) -m bench.agent

bench-heal: bootstrap
	$(PY) -m bench.heal

bench-barrier: bootstrap
	$(PY) -m bench.barrier

bench-update: bootstrap
	$(PY) -m bench.update

bench-failover: bootstrap
	$(PY) -m bench.failover

bench-env: bootstrap
	$(PY) -m bench.env

bench-rolling: bootstrap
	$(PY) -m bench.rolling

bench-control: bootstrap
	$(PY) -m bench.control

clean: sandbox-down
	rm -rf .run build
