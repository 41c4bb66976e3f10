# `make serve` and `make test` work on a fresh clone: each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test install fashion-mnist clean

serve: $(BIN)/.installed
	$(BIN)/vit-serve

test: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

# The tests read Fashion-MNIST from Debian's package; elsewhere the loader downloads it into data/.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
