# Two commands: `make run` (install, then train on the embedded default) and `make test`.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVICE ?= gtx750-1gb

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import edgetrain, torch, torchvision" && touch $(STAMP)

run: $(STAMP)
	$(BIN)/edgetrain fit --device $(DEVICE)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=20

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/memory_grid.py

clean:
	rm -rf $(VENV) build *.egg-info
