# gelato: two commands on a fresh machine.
#   make demo   - set up .venv and run the main job on the embedded default (Fashion-MNIST)
#   make test   - set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo test venv venv-test data clean-demo help

help:
	@echo "make demo   # the whole pipeline on Fashion-MNIST into $(RUN) (creates/reuses .venv)"
	@echo "make test   # run the test suite (creates/reuses .venv with test extras)"

# The stamp files make a second run instant; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# Fashion-MNIST: the Debian package where we can install it, else torchvision's download
# (done by the ingest itself); .ci/ensure-fashion-mnist says what to do when neither works.
data:
	@bash .ci/ensure-fashion-mnist

# ingest -> SimCLR pretraining (Ray, 2 workers) -> probe / kNN / fine-tune -> the Gelato Bet table.
# Rerunning reuses every finished stage; a run killed mid-way resumes where it stopped.
demo: venv data
	$(BIN)/gelato run --config configs/pipeline_demo.yaml --run $(RUN)

test: venv-test
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(RUN)
