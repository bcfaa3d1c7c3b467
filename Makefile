# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test prometheus lint bench protos clean

$(VENV)/.installed: pyproject.toml setup.py loadagg/server/_figures.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	# sglang 0.5.23's load publisher and snapshot writer drive the push-source tests. Its declared
	# dependencies pull the GPU stack (torch, CUDA ...), which those two modules never use: --no-deps.
	$(PY) -m pip install -q --no-deps sglang==0.5.23
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/loadagg demo

test: $(VENV)/.installed prometheus
	$(PY) -m pytest -q

# Prometheus and promtool (Debian's package) for the tests that scrape a live aggregator and test the alert rules.
prometheus:
	@scripts/install_prometheus.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[all,test,bench]'
	$(PY) -m bench all

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache
