# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo

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

# FluidSynth and General MIDI SoundFonts render the synthetic data set: the demo trains on three fonts and tests on
# a fourth it never saw (Debian's packages; MuseScore General is kept out of Timbre for an independent check).
# Chromium drives the serving page in the tests (headless); g++ builds the kernels of torch.compile (train.compile).
SF2          := /usr/share/sounds/sf2
TRAIN_FONTS  := $(SF2)/FluidR3_GM.sf2 $(SF2)/sf_GMbank.sf2 $(SF2)/OPL-3_FM_128M.sf2
TEST_FONT    := $(SF2)/TimGM6mb.sf2
SYSTEM_PACKAGES := fluidsynth fluid-soundfont-gm csound-soundfont opl3-soundfont timgm6mb-soundfont chromium g++

system-deps:
	@if command -v fluidsynth >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 && for f in $(TRAIN_FONTS) $(TEST_FONT); do [ -e $$f ] || exit 1; done; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "timbre: FluidSynth, a SoundFont, Chromium or g++ is missing; install them with: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; \
	fi

install: system-deps $(STAMP)

# The main job end to end: render (three training fonts, an unseen test font), pack, fine-tune with validation curves,
# evaluate on the unseen font and print the scores next to the yardsticks (about 20 minutes on 2 cores). Everything is
# rendered at 44.1 kHz and resampled by pack: FluidSynth does not band-limit, so `synth --sample-rate 16000` (twice as
# fast) folds the top of the spectrum into 6-8 kHz, and the log-mel regression trained on such clips loses 0.05 LRAP.
demo: install
	$(PY) -m shards synth $(DEMO)/synth --train-per-class 1000 --test-files 0 --unlabeled 0 --seed 0 --soundfont $(TRAIN_FONTS) --workers 2
	$(PY) -m shards synth $(DEMO)/synth-test --train-per-class 0 --test-files 200 --unlabeled 0 --seed 1 --soundfont $(TEST_FONT) --workers 2
	$(PY) -m shards pack irmas-train $(DEMO)/synth/IRMAS-TrainingData $(DEMO)/shards/irmas-train --val-fraction 0.1 --workers 2
	$(PY) -m shards pack irmas-test $(DEMO)/synth-test/IRMAS-TestingData-Part1 $(DEMO)/shards/irmas-test --workers 2
	$(PY) -m shards verify $(DEMO)/shards/irmas-train
	$(PY) -m shards stats $(DEMO)/shards/irmas-train --plot $(DEMO)/irmas-train-classes.png
	$(PY) -m finetune recipes/finetune/cpu-synth.yaml output_dir=$(DEMO)/finetune/cpu resume=auto
	$(PY) -m finetune evaluate $(DEMO)/finetune/cpu/model $(DEMO)/shards/irmas-test --out $(DEMO)/report --precision auto
	$(PY) -m finetune yardsticks $(DEMO)/shards/irmas-train/train $(DEMO)/shards/irmas-train/val $(DEMO)/shards/irmas-test \
		--report $(DEMO)/report/report.json --out $(DEMO)/report/yardsticks.json

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/shard_io.py
	$(PY) bench/backbone.py
	$(PY) bench/pretrain_speed.py
	$(PY) bench/inference.py
	$(PY) bench/serve.py

# Does pretraining pay where labels are few? Scratch vs each objective, 3 seeds, on an unseen-SoundFont test set.
bench-quality: install
	$(PY) bench/quality.py --write-results --notes bench/quality_notes.md

bench-quality-tiny: install
	$(PY) bench/quality.py --budget tiny --out bench/out/quality-tiny

clean:
	rm -rf $(DEMO) .pytest_cache
