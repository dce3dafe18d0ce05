# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo
SOUNDFONT_DIR := /usr/share/sounds/sf2

.PHONY: install lock system-deps demo test bench bench-quality bench-quality-tiny clean

# Installs come from the lock file alone, so a release upstream cannot break a fresh clone.
# pyproject.toml keeps the compatible ranges; `make lock` re-resolves them into $(LOCK).
LOCK       := requirements.lock
UV_VERSION := 0.13.9
UV         := $(VENV)/bin/uv
# torch 2.14.1 is the newest release tested with torchaudio 2.11.1 (the pair the benchmarks measure).
TORCH_PIN  := torch==2.14.1

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml $(LOCK) | $(UV)
	$(UV) pip install --quiet --python $(PY) -r $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Refresh the lock after editing pyproject.toml's dependencies (tests fail while the two disagree).
lock: | $(UV)
	echo "$(TORCH_PIN)" | $(UV) pip compile pyproject.toml - --extra dev --universal --python-version 3.11 \
		--index-url https://pypi.org/simple --custom-compile-command "make lock" --quiet -o $(LOCK)

# FluidSynth and a General MIDI SoundFont render the synthetic data set.
system-deps:
	@if command -v fluidsynth >/dev/null 2>&1 && [ -e $(SOUNDFONT_DIR)/FluidR3_GM.sf2 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null; \
	else \
		echo "timbre: FluidSynth is missing; install it with: sudo apt-get install fluidsynth fluid-soundfont-gm (or brew install fluid-synth)"; exit 1; \
	fi

install: system-deps $(STAMP)

demo: install
	$(PY) -m shards synth $(DEMO)/synth --train-per-class 24 --test-files 24 --unlabeled 240 --seed 0
	$(PY) -m shards pack irmas-train $(DEMO)/synth/IRMAS-TrainingData $(DEMO)/shards/irmas-train --val-fraction 0.2 --workers 2
	$(PY) -m shards pack irmas-test $(DEMO)/synth/IRMAS-TestingData-Part1 $(DEMO)/shards/irmas-test --workers 2
	$(PY) -m shards pack folder $(DEMO)/synth/unlabeled $(DEMO)/shards/unlabeled --segment-seconds 3 --workers 2
	$(PY) -m shards verify $(DEMO)/shards/irmas-train
	$(PY) -m shards stats $(DEMO)/shards/irmas-train --plot $(DEMO)/irmas-train-classes.png
	$(PY) -m pretrain recipes/pretrain/mae-tiny-synth.yaml output_dir=$(DEMO)/pretrain/mae-tiny
	$(PY) -m finetune recipes/finetune/fluffy-tiny-synth.yaml backbone=$(DEMO)/pretrain/mae-tiny/backbone output_dir=$(DEMO)/finetune/fluffy-tiny
	$(PY) -m finetune evaluate $(DEMO)/finetune/fluffy-tiny/model $(DEMO)/synth/IRMAS-TestingData-Part1 --out $(DEMO)/report

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/shards.py
	$(PY) bench/backbone.py
	$(PY) bench/pretrain.py
	$(PY) bench/inference.py

# Does pretraining help? Scratch vs each objective on a cross-SoundFont test set (< 90 min on 2 cores).
bench-quality: install
	$(PY) bench/quality.py --write-results --notes bench/quality_notes.md

bench-quality-tiny: install
	$(PY) bench/quality.py --budget tiny --out bench/out/quality-tiny

clean:
	rm -rf $(DEMO) .pytest_cache
