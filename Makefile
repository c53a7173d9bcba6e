# Two entry points for people: `make run` and `make test`. Both rest on `make install`, which is
# idempotent and builds everything in .venv at the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools dcm2niix chromium fonts-liberation prometheus postgresql
CONFIG ?= deploy/example.toml

.PHONY: install system-packages run test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Real peers for the tests: Orthanc as the PACS (with DICOMweb for the viewer), DCMTK as
# modalities, dicom3tools to validate, Chromium to run the OHIF viewer, PostgreSQL for the
# database tests on that backend (the tests make and remove their own cluster).
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: install
	$(BIN)/dicom-node serve --config $(CONFIG)

test: install system-packages
	$(BIN)/python -m pytest
