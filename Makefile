# `make serve` and `make test` work on a fresh clone: each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test lint install system-packages clean

serve: $(BIN)/.installed
	$(BIN)/vit-serve

test: lint system-packages
	$(BIN)/pytest

# The style pyproject.toml declares (ruff's defaults, line length, bugbear, import order), checked, not hoped for.
lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(BIN)/.installed

# Serving needs the runtime dependencies only; the tests add the dev extra (timm, schemathesis, Playwright, ...).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -e '.[dev]'
	touch $@

# The tests read Fashion-MNIST from Debian's package, drive the demo page in Debian's chromium, and build
# and run the image with Debian's Docker engine (the Docker test starts dockerd when none runs). Elsewhere
# the loader downloads the dataset into data/, chromium must be at /usr/bin/chromium, and the Docker test
# skips where no engine can be started.
system-packages:
	@if { [ ! -d $(FASHION_MNIST) ] || [ ! -x /usr/bin/chromium ] || ! command -v dockerd >/dev/null; } \
		&& command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			dataset-fashion-mnist chromium docker.io docker-compose debootstrap; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
