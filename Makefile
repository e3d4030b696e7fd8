# gelato: two commands on a fresh machine.
#   make demo   - set up .venv and run the main job on the embedded default (Fashion-MNIST)
#   make test   - set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo video-demo audio-demo av-demo test venv venv-test data clean-demo help

help:
	@echo "make demo   # the whole pipeline on Fashion-MNIST into $(RUN) (creates/reuses .venv)"
	@echo "make test   # run the test suite (creates/reuses .venv with test extras)"
	@echo "make video-demo # the video pipeline on generated Moving Fashion-MNIST into runs/video-demo"
	@echo "make audio-demo # the audio pipeline on generated speech (spoken-digits, espeak-ng) into runs/audio-demo"
	@echo "make av-demo    # sound and picture: Moving Fashion-MNIST with sound into runs/av-demo"

# pip byte-compiles every installed module one file at a time (95 of the 190 s a fresh install took
# here); installing with --no-compile and then compiling on every core with compileall takes 45 s.
# (Compile errors in packages' own stray files are ignored, as pip ignores them.)
PIP      := $(BIN)/python -m pip install -q --no-compile
COMPILE  := $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib >/dev/null 2>&1 || true

# The stamp files make a second run instant; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	@$(COMPILE)
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test,export,tracking]'
	@$(COMPILE)
	@touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

# Fashion-MNIST: the Debian package where we can install it, else torchvision's download
# (done by the ingest itself); .ci/ensure-fashion-mnist says what to do when neither works.
# espeak-ng (Debian package): the speech synthesiser that generates spoken-digits.
data:
	@bash .ci/ensure-fashion-mnist
	@bash .ci/ensure-espeak-ng

# ingest -> SimCLR pretraining (Ray, 2 workers) -> probe / kNN / fine-tune -> the Gelato Bet table.
# Rerunning reuses every finished stage; a run killed mid-way resumes where it stopped.
demo: venv data
	$(BIN)/gelato run --config configs/pipeline_demo.yaml --run $(RUN)

# generated Moving Fashion-MNIST clips -> TCN on two cameras -> frame, clip, label-propagation and
# alignment protocols (configs/pipeline_video_demo.yaml)
video-demo: venv data
	$(BIN)/gelato run --config configs/pipeline_video_demo.yaml

# generated speech (spoken-digits, espeak-ng) -> an audio objective -> probe and kNN of the word and
# the voice against log-mel, random init and the supervised reference (configs/pipeline_audio_demo.yaml)
audio-demo: venv data
	$(BIN)/gelato run --config configs/pipeline_audio_demo.yaml

# Moving Fashion-MNIST with sound -> audio-visual correspondence -> which item sounds, and where
# (configs/pipeline_av_demo.yaml)
av-demo: venv data
	$(BIN)/gelato run --config configs/pipeline_av_demo.yaml

test: venv-test data
	$(BIN)/python -m pytest -q --durations=15

clean-demo:
	rm -rf $(RUN)
