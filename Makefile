# Orthanc AI — two commands: `make run` and `make test`. Both install what they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
REQS := requirements.txt requirements-dev.txt
VENV_STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb orthanc-wsi dcmtk dicom3tools poppler-utils fonts-dejavu-core chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps venv viewer unit integration e2e bench clean help

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

# The OHIF viewer served at /ohif/: the pinned @ohif/app tarball (npm pack, once, into build/cache),
# unpacked without source maps and patched for the /ohif/ prefix, with our extension beside it.
# A second run only re-syncs our extension files (well under a second).
viewer:
	@$(PYTHON) viewer_extension/install.py

run: deps venv viewer
	TCP_NODELAY=1 $(VENV)/bin/python -m orthanc_plugin.launcher

unit: venv
	$(VENV)/bin/python -m pytest tests/unit -q

integration: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m pytest tests/integration -q

e2e: deps venv viewer
	TCP_NODELAY=1 $(VENV)/bin/python -m pytest tests/e2e -q

test: deps venv viewer
	TCP_NODELAY=1 $(VENV)/bin/python -m pytest -q

bench: deps venv
	TCP_NODELAY=1 $(VENV)/bin/python -m tests.bench.bench_ingest
	$(VENV)/bin/python -m tests.bench.bench_results
	$(VENV)/bin/python -m tests.bench.eval_brain_lesion
	TCP_NODELAY=1 $(VENV)/bin/python -m tests.bench.bench_load 20 4
	nice -n 10 $(VENV)/bin/python -m tests.bench.bench_wsi
	TCP_NODELAY=1 $(VENV)/bin/python -m tests.bench.bench_model_overhead
	TCP_NODELAY=1 $(VENV)/bin/python -m tests.bench.bench_dicomweb

clean:
	rm -rf var .pytest_cache
