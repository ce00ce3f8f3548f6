# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a step of theirs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := bash stack/stack.sh

.PHONY: help up down clean venv lint test unit integration demo status bench bench-full bench-debezium bench-transactions faults soak docs

help:
	@echo "make demo        stack up, writer + source + sink running, live counts (Ctrl-C stops)"
	@echo "make test        stack up, ruff, mypy --strict, the whole test suite"
	@echo "make up|down     start|stop the local PostgreSQL x2 + Kafka stack (make clean: also delete data)"
	@echo "make bench       quick benchmark against in-run baselines (bench-full: the whole grid, Debezium, transactions)"
	@echo "make bench-debezium  Debezium's PostgreSQL source and JDBC sink beside ours (jars from Maven Central)"
	@echo "make bench-transactions  --consistency transaction against row, on pgbench's TPC-B-like transactions"
	@echo "make faults      the fault-injection suite, long version (make soak: 10-minute soak)"

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

up: venv
	$(STACK) up

down:
	$(STACK) down

clean:
	$(STACK) clean

status: venv
	$(STACK) status

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q

test: up lint
	$(BIN)/pytest -q

demo: up
	$(BIN)/python -m demo

bench: up
	$(BIN)/python -m bench.run --quick

# --full includes scenario 7, the Debezium baseline (bench/debezium.py), and scenario 8, source
# transactions applied whole against row by row (bench/scenarios/transactions.py)
bench-full: up
	$(BIN)/python -m bench.run --full

# e.g. make bench-debezium BENCH_ARGS='--changes 20000' for a short run
bench-debezium: up
	$(BIN)/python -m bench.run --only debezium $(BENCH_ARGS)

# e.g. make bench-transactions BENCH_ARGS='--changes 20000 --tpcb-partitions 3' for a short run
bench-transactions: up
	$(BIN)/python -m bench.run --only transactions $(BENCH_ARGS)

faults: up
	$(BIN)/pytest -q tests/faults --long

soak: up
	$(BIN)/python -m tests.faults.soak --minutes 10

docs: venv
	$(BIN)/python -m scripts.reference --write
	$(BIN)/python -m bench.readme
