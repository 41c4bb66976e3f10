# `make serve` and `make test` work on a fresh clone: each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test test-floors lint install system-packages clean

serve: $(BIN)/.installed
	$(BIN)/vit-serve

test: lint system-packages
	$(BIN)/pytest

# The tests again, with every runtime dependency at the lowest version that pyproject.toml allows (torch and
# torchvision too: PyPI's CUDA build, about 3 GB where pip has not cached it; the dev extra at its newest), in a
# venv of their own: a floor that claims too much fails here rather than in a user's older environment. The Docker
# test is left out: the image installs its own.
FLOORS := .venv-floors
test-floors: system-packages
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/pip install --upgrade pip
	$(FLOORS)/bin/python -c 'import re, tomllib; \
		project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		requirements = project["dependencies"] + project["optional-dependencies"]["datasets"]; \
		print(*(re.sub(r"\[.*\]", "", r).replace(">=", "==") for r in requirements), sep="\n")' \
		> $(FLOORS)/floors.txt
	$(FLOORS)/bin/pip install -c $(FLOORS)/floors.txt -e '.[dev]'
	$(FLOORS)/bin/pytest --deselect tests/test_docker.py

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
	rm -rf $(VENV) $(FLOORS) *.egg-info .pytest_cache
