# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch on few shared cores: OpenMP threads must not busy-wait (see tests/conftest.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast venv broker-jars ops-tools lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# One resolve for the whole pinned stack (see shared design/toolchain.md).
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

# Apache Kafka jars from Maven Central, cached under ~/.cache/stream-asd (outside the tree).
broker-jars: $(STAMP)
	$(VENV)/bin/stream-asd broker provision

# helm, kubernetes-validate, hadolint, prometheus/promtool, cached under ~/.cache/stream-asd-tools.
ops-tools:
	PYTHON=$(PYTHON) scripts/install-ops-tools.sh

demo: broker-jars
	$(VENV)/bin/stream-asd demo

test: broker-jars ops-tools
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not kafka and not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
