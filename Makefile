# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both install everything on a fresh machine (Python venv from the lock file,
# the Kafka broker's jars from Maven Central, Debian's prometheus for the checks).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test lint typecheck unit integration bench clean

$(STAMP): requirements.lock pyproject.toml
	@command -v java >/dev/null || { echo "streamrec needs Java 17+ (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn  >/dev/null || { echo "streamrec needs Maven (apt-get install maven)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python -q -r requirements.lock -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/streamrec kafka fetch

# Main job: local Kafka + topics + a small model + the worker + a live replay + a summary.
demo: install
	$(BIN)/streamrec demo

# Whole suite: format, lint, types, unit, integration (real broker, real Prometheus).
test: install
	bash deploy/install-system-deps.sh
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q tests

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	-$(BIN)/streamrec kafka stop
	rm -rf .streamrec .cache runs reports
