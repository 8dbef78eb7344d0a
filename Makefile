# zk0: `make demo` and `make test` set everything up themselves (Python 3.12 venv in .venv).
PYTHON ?= python3.12
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zk0-installed
export ZK0_HOME := $(CURDIR)

.PHONY: install demo test test-fast lint format lab app app-check smoke compare study base bench deploy-local clean help rehearse

help:
	@echo "make demo     the offline demo: notebooks 01 -> 04 on the simulated labs into reports/demo (CPU)"
	@echo "make test     run the test suite (offline, CPU)"
	@echo "make test-fast  the tests without Flower runs, CLI processes, sweeps and notebooks (minutes)"
	@echo "make install  create .venv with the pinned environment (done by demo/test when needed)"
	@echo "make lab      JupyterLab on notebooks/ with the zk0 kernel"
	@echo "make app      the marimo results app (http://127.0.0.1:2718)"
	@echo "make app-check  load the app in headless Chromium, screenshot to reports/app-check.png"
	@echo "make lint     ruff check and format check"
	@echo "make smoke    zk0 train --preset smoke (2 clients x 2 rounds, ~1.5 min)"
	@echo "make compare  fedavg, fedprox, fedadam vs centralized and local-only on the demo (reports/compare)"
	@echo "make study    the closed-loop study: the same five rows on the study preset (reports/compare)"
	@echo "make base     remake the shipped tiny base zk0lib/assets/tiny-base (zk0 base, community labs)"
	@echo "make bench    zk0 bench comms, overhead, dataloader, gpu-step (reports/bench)"
	@echo "make deploy-local  the demo on Flower's Deployment Engine, TLS + SuperNode auth, on 127.0.0.1"
	@echo "make rehearse  the real path at full size, offline (smolvla_base-shaped, both engines; ~15 min on 2 cores)"

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "zk0 needs Python 3.12 ($(PYTHON) not found): install it (pyenv install 3.12, apt, conda) or run make PYTHON=/path/to/python3.12"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { echo "$(PYTHON) is not Python 3.12"; exit 1; }
	@$(PYTHON) zk0lib/syslibs.py --install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name zk0 --display-name "zk0 (Python 3.12)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/zk0 workbook --preset demo --out reports/demo

smoke: install
	$(BIN)/zk0 train --preset smoke

test: install  # serial: two Ray simulations starting together on 2 cores time out (README, Timings)
	$(BIN)/python -m pytest -q tests notebooks --nbmake

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lab: install
	$(BIN)/jupyter lab notebooks/

app: install
	$(BIN)/marimo run notebooks/results_app.py --host 127.0.0.1 --port 2718

app-check: install
	$(BIN)/zk0 app-check

compare: install
	$(BIN)/zk0 compare --preset demo --strategies fedavg,fedprox,fedadam

study: install
	$(BIN)/zk0 compare --preset study --strategies fedavg,fedprox,fedadam

base: install
	$(BIN)/zk0 base

bench: install
	$(BIN)/zk0 bench comms
	$(BIN)/zk0 bench overhead --preset demo --repeats 3
	$(BIN)/zk0 bench dataloader --preset demo
	$(BIN)/zk0 bench gpu-step

deploy-local: install
	$(BIN)/zk0 deploy-local --preset demo

rehearse: install
	$(BIN)/zk0 rehearse

clean:
	rm -rf reports data_cache/flwr
