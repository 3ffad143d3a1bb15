# rft-hub: two commands do everything on a fresh machine.
#   make run    the whole local stack in the foreground (Ctrl-C stops it)
#   make test   the test suite (lint, then every test)
#   make test-unit  the pure tests alone, in seconds (no local stack)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAGE ?= dev

.PHONY: setup run test test-unit lint bench package clean litellm

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# Java for DynamoDB Local (AWS's own engine, from the npm package amplify-dynamodb-simulator).
.local/.java:
	@command -v java >/dev/null || { echo "installing a Java runtime for DynamoDB Local"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	@mkdir -p .local && touch $@

# Chromium for the console's browser tests (tests/test_console.py), from Debian's packages: Playwright
# drives /usr/bin/chromium (never `playwright install`). If it cannot be installed, those tests fail
# saying so; RFT_SKIP_BROWSER=1 skips them (and this step) explicitly.
.local/.chromium:
	@if [ "$$RFT_SKIP_BROWSER" != 1 ] && ! command -v chromium >/dev/null; then \
	  echo "installing Chromium for the console's browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "could not install chromium: tests/test_console.py will fail (RFT_SKIP_BROWSER=1 skips it)"; fi
	@if command -v chromium >/dev/null; then mkdir -p .local && touch $@; fi

setup: $(STAMP) .local/.java
	$(BIN)/python -c "from local.servers import ensure_dynamodb_local; ensure_dynamodb_local()"

run: setup
	$(BIN)/python -m local.run

# LiteLLM in its own virtual environment (it needs openai<3; rft-hub pins 3.x): the streaming tests
# use it as a client, the benchmark as the baseline proxy. Pinned in bench/streaming.py; once per machine.
litellm: $(STAMP)
	$(BIN)/python -c "from bench.streaming import ensure_litellm; ensure_litellm()"

lint: $(STAMP)
	$(BIN)/ruff check .

# Pure tests: no servers (tests/unit reads the code, the domain and the layering).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test: setup .local/.chromium litellm lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Deployable artefacts for STAGE=dev|prod, without AWS credentials: build/STAGE/sam.json + deployment.zip.
package: $(STAMP)
	rm -rf build/$(STAGE)
	RFT_STAGE=$(STAGE) RFT_TABLE_PREFIX=rfthub-$(STAGE)- $(BIN)/python -m deploy.template $(STAGE)
	AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-west-2} $(BIN)/chalice package --stage $(STAGE) \
	  --merge-template build/resources-$(STAGE).json build/$(STAGE)
	$(BIN)/python -m deploy.template --slim build/$(STAGE)/deployment.zip   # botocore models in use only; fails over 20 MB
	$(BIN)/cfn-lint build/$(STAGE)/sam.json
	@echo "packaged: build/$(STAGE)/sam.json"

bench: setup litellm
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .local $(VENV)
