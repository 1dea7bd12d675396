# Orthanc AI — two commands: `make run` and `make test`. Both install what they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
REQS := requirements.txt requirements-dev.txt
VENV_STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools poppler-utils fonts-dejavu-core
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps venv unit integration bench clean help

help:
	@echo "make run    start Orthanc + AI plugin + worker (data in \$$ORTHANC_AI_DATA, default ./var)"
	@echo "make test   run the whole test suite"
	@echo "make bench  run the benchmarks (ingest ratio, job latency)"

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV_STAMP)

$(VENV_STAMP): $(REQS)
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*; touch $@

run: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m orthanc_plugin.launcher

unit: venv
	$(VENV)/bin/python -m pytest tests/unit -q

integration: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m pytest tests/integration -q

test: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m pytest -q

bench: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m tests.bench.bench_ingest
	$(VENV)/bin/python -m tests.bench.bench_results
	$(VENV)/bin/python -m tests.bench.eval_brain_lesion

clean:
	rm -rf var .pytest_cache
