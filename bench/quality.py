"""Does pretraining on unlabeled audio pay where labels are few? The end-to-end quality benchmark, printed as JSON.

The case users are in: few labels from one narrow source, plenty of unlabeled audio from many sources, a test on a
source the labels never showed. It runs the toolkit's own command lines, one subprocess per step, as a user would:
1. `shards synth`: labelled IRMAS-layout clips rendered with one SoundFont (FluidR3_GM), an unlabeled pool of
   3-12 s music with several (by default the demo's three training fonts, one drawn per clip), and polyphonic
   IRMAS-layout test files rendered with a font in neither set (pretty_midi's TimGM6mb), other pieces and seeds;
   the same test pieces are also rendered with the labelled set's font, to show what the unseen timbres cost;
2. `shards pack` each (the labelled set with a song-grouped validation split for thresholds and the best
   checkpoint), and nested, song-grouped subsets of the labelled set for the label-efficiency curve (8/16/32);
3. `pretrain` the same CPU-sized backbone with each objective's recipe for the same compute (steps x batch),
   logging its loss curve;
4. `finetune` each backbone and a from-scratch baseline with the shipped CPU recipe (recipes/finetune/cpu-synth.yaml)
   and the waveform augmentation switched on (FEW_LABELS_FINETUNE), one run per seed (a pretrained backbone's
   non-overlapping patches re-gridded to the recipe's overlapping ones), and a frozen-feature linear probe of each;
   `synth-labels`, shown apart from the objectives, trains the recipe on labelled clips the synth renders in the
   pool's fonts instead, and its fine-tunes continue that model (`init_from`): labels from a renderer, not unlabeled
   audio;
5. `finetune evaluate` every model on the test shards (the numbers come from its report.json), and each row's
   seeds' fine-tunes together as one ensemble on the unseen font; `finetune yardsticks` (no information; log-mel
   statistics + logistic regression) on the same data; and each main-table fine-tune again after `finetune
   calibrate` moved its thresholds to an unlabeled collection in the test's font (other pieces than the test's,
   labels unread): what a user with their target audio, but no labels for it, gets;
6. write RESULTS.md (mean +- std over seeds, targets, pretraining curves, commands, seeds, machine, date) and a
   label-efficiency plot with error bars (scratch vs the best objective) to --out, and to bench/ with
   --write-results.

Every stage is resumable: a stage finished under the same key (its command, the recipe it reads and the stages
it depends on) is skipped, an interrupted one is rerun with the CLIs' own resume (synth and pack finish the job,
training uses `resume=auto`), and a changed one is cleared and rerun with everything downstream of it. Each
command and its log file are printed to stderr (logs under OUT/logs); a failing step stops the run with one line
naming the stage. Delete OUT after changing the toolkit's code: the keys do not cover it.

    python bench/quality.py --budget tiny --out bench/out/quality-tiny   # ~70 short stages, 15-30 min (19.9 min on 2026-12-05): checks the pipeline
    python bench/quality.py --write-results --notes bench/quality_notes.md   # the full table: bench/RESULTS.md

`--table supervised` is the supervised-only table instead: no pretraining; the shipped CPU recipe
(recipes/finetune/cpu-synth.yaml, a scratch ViT) trained with several seeds on clips rendered with the demo's three
training SoundFonts, against the log-mel regression and no-information yardsticks, on test pieces rendered with
an unseen SoundFont and with the training fonts:

    python bench/quality.py --table supervised --write-results   # bench/RESULTS-supervised.md, ~35 min on 2 cores

(three seeds by default; `--seeds 0 1` took 23 minutes with the overlapping-patch recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.errors import UserError, run_cli
from core.recipe import load_recipe
from finetune.calibrate import MIN_FILES
from finetune.metrics import HEADLINE
from finetune.train import FinetuneRecipe
from finetune.yardsticks import REGRESSION, yardsticks
from shards.format import MANIFEST
from shards.sources import TRAIN_DIR, scan
from shards.synth.plans import TEST_DIR
from shards.synth.render import FLUIDR3, bundled_soundfont

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RECIPES = ROOT / "recipes"
SF2 = Path("/usr/share/sounds/sf2")
DEMO_TRAIN_FONTS = (SF2 / "FluidR3_GM.sf2", SF2 / "sf_GMbank.sf2", SF2 / "OPL-3_FM_128M.sf2")  # as `make demo`
OBJECTIVES = ("mae", "teacher", "electra", "metric", "combined")  # self-supervised: what the issue asks about
# Not unlabeled audio: a backbone trained with the shipped recipe on labelled clips that the synth renders in the
# pool's fonts (labels from the renderer; the demo's 4000 steps, as its validation curve still climbs at the
# objectives' 1500 and flattens by 4000), then continued on the labelled clips with its head (`init_from`) at a tenth
# of the recipe's learning rate, the rendered clips mixed in (rehearsal: the labelled training split listed as often
# as makes it SYNTH_LABELS_REHEARSAL of the examples), so it keeps what the fonts taught it; thresholds and the best
# checkpoint come from both validation splits, so they hold across fonts.
SYNTH_LABELS = "synth-labels"
SYNTH_LABELS_FINETUNE = ("model.frequency_stride=null", "train.lr=1e-4")
SYNTH_LABELS_REHEARSAL = 1 / 8
SYNTH_LABELS_VAL_FRACTION = 0.1
VAL_FRACTION = 0.2
# Every fine-tune of the unlabeled-audio table (scratch, each backbone, synth-labels) also colours its few one-font
# clips as other bodies, microphones and rooms would: the shipped recipe leaves the waveform augmentation off, tuned
# on 1000 clips per class in three fonts, but at 16 per class in one font it lifts a scratch fine-tune by +0.069 macro
# F1 and +0.016 LRAP on the unseen font (five seeds), about what the best pretraining gave it unaugmented; a
# backbone must beat that scratch row, not a weaker one (bench/quality_notes.md, twenty-eighth session).
FEW_LABELS_FINETUNE = ("augment.filters=0.3", "augment.noise=0.3", "augment.reverb=0.3")
ROW_SCORES = ("macro_f1", "micro_f1", "lrap", "map", "same_font_macro_f1", "same_font_lrap", "calibrated_macro_f1",
              "calibrated_micro_f1")  # fine-tune columns
# Validations per fine-tune (each scores the recipe's validation mixtures and files, ~25 s; the best one is kept).
VALIDATIONS = 2
# Checkpoints per pretraining run (the objectives' probe, synth-labels' validation: the curves in RESULTS.md).
PRETRAIN_CHECKPOINTS = 4
TARGET_MARGIN, TARGET_MACRO_F1 = 0.10, 0.60  # the bar: pretrained - scratch, best fine-tuned macro F1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Sizes of one benchmark run; `main_per_class` is the budget of the main table (one of `labelled_per_class`)."""

    unlabeled: int  # pretraining pool: 3-12 s clips, each rendered with one of the pool's SoundFonts
    labelled_per_class: tuple[int, ...]  # label-efficiency points: labelled 3 s clips per class (train + val)
    main_per_class: int
    test_files: int  # 5-20 s polyphonic test excerpts
    size: str  # the backbone size every run uses (pretrain.backbone.SIZES)
    seeds: tuple[int, ...]  # fine-tuning seeds of every fine-tuned row and label-efficiency point
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    probe_steps: int
    probe_batch: int
    synth_labels_per_class: int  # labelled clips per class the synth renders in the pool's fonts for synth-labels
    synth_labels_steps: int  # its training steps (of pretrain_batch clips)


BUDGETS = {
    # Checks the pipeline end to end in minutes; its numbers say nothing about quality.
    "tiny": Budget(unlabeled=24, labelled_per_class=(4, 6), main_per_class=6, test_files=8, size="cpu-2",
                   seeds=(0, 1), pretrain_steps=3, pretrain_batch=4, finetune_steps=4, finetune_batch=4,
                   probe_steps=4, probe_batch=8, synth_labels_per_class=4,
                   synth_labels_steps=3),
    # Measured on 2 cores (AMD EPYC, 2026-12-05/06): rendering + packing the pool's 10,000 clips 9 min (the issue's
    # aim; 6000: 5 min, and a 6000-clip pool fine-tunes no differently, bench/quality_notes.md); pretraining cpu-2 at
    # 61-147 clips/s, 1500 x 32 clips 6-14 min per objective; a 400-step fine-tune 80-110 s; an evaluation 20-35 s.
    # The table with three objectives (mae, teacher, metric) took 112 min; with all five, ~2 h on the 6000-clip pool
    # (the larger pool adds ~4 min of rendering, not pretraining); synth-labels adds ~55 min of stages (rendering and
    # packing 6, its 4000 steps 10, its fine-tunes, evaluations, calibrations and label-efficiency points 39;
    # 2026-12-06, Intel Xeon). 1500 pretraining steps are enough for the objectives: metric for 4000 steps (37.7 min,
    # AMD EPYC), MAE for 10,000 (39.5 min; loss still falling, in-domain probe flat) and the teacher for 5000 (28.1
    # min; in-domain probe up 0.1 LRAP) fine-tune as at 1500 (bench/quality_notes.md).
    "full": Budget(unlabeled=10000, labelled_per_class=(8, 16, 32), main_per_class=16, test_files=200, size="cpu-2",
                   seeds=(0, 1, 2), pretrain_steps=1500, pretrain_batch=32, finetune_steps=400, finetune_batch=32,
                   probe_steps=300, probe_batch=32, synth_labels_per_class=1000,
                   synth_labels_steps=4000),
}


# --- Stages ----------------------------------------------------------------------------------


class Runner:
    """Runs each stage's command once and remembers it under OUT/stages/<name>.json.

    A stage's key hashes its command, the contents of the files it reads that the command line does not show
    (recipes) and the runs of the stages it depends on, so a stage that runs again reruns what reads it. A stage
    finished under the same key is skipped; a stage last started under another key has its output cleared
    first, so changing a recipe, a step count or the data reruns exactly what depends on it and never resumes
    another configuration's checkpoints. A stage interrupted and run again under the same key resumes, and its
    seconds add up every leg (an interrupted leg lasted until its log was last written).
    """

    def __init__(self, *, out: Path, env: dict[str, str]) -> None:
        self.env = env
        self.records = out / "stages"
        self.logs = out / "logs"
        self.records.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs: dict[str, str] = {}  # stage -> its finished run, as later stages' keys see it
        self.seconds: dict[str, float] = {}
        self.commands: list[tuple[str, str]] = []

    def run(self, name: str, command: list[str], *, output: Path, done: Path, after: tuple[str, ...] = (),
            files: tuple[Path, ...] = (), fresh: bool = False) -> None:
        """Run stage `name` unless it finished under the same key; `done` exists once `output` is complete.
        `fresh`: clear `output` before running (for commands that refuse to write over an existing output)."""
        key = hashlib.sha256(json.dumps({
            "command": command, "after": [self.runs[stage] for stage in after],
            "files": [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in files],
        }).encode()).hexdigest()
        record_path = self.records / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        shown = shlex.join(command)
        self.commands.append((name, shown))
        if record and record.get("key") == key and "run" in record and done.exists():
            print(f"[bench] {name}: done earlier ({record['seconds']:.0f} s), skipped", file=sys.stderr)
            self.seconds[name], self.runs[name] = record["seconds"], record["run"]
            return
        if (fresh or (record and record.get("key") != key)) and output.exists():
            shutil.rmtree(output)
        log = self.logs / f"{name}.log"
        resumed = bool(record and record.get("key") == key and "started" in record and output.exists())
        earlier = 0.0  # seconds of this key's interrupted legs, whose output the command resumes from
        if resumed:
            last_write = log.stat().st_mtime if log.is_file() else record["started"]
            earlier = record["earlier_seconds"] + max(0.0, last_write - record["started"])
        record_path.write_text(json.dumps({"key": key, "command": command, "status": "running",
                                           "started": time.time(), "earlier_seconds": earlier}) + "\n")
        print(f"[bench] {name}: $ {shown}  (log: {log})", file=sys.stderr)
        started = time.perf_counter()
        with open(log, "a" if resumed else "w") as handle:  # an interrupted leg's log is kept above the next
            status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=self.env).returncode
        seconds = earlier + time.perf_counter() - started
        if status != 0 or not done.exists():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
            last = lines[-1] if lines else "no output"
            why = f"exited with status {status}" if status else f"did not write {done}"
            raise UserError(f"stage {name} failed: {why} ({last[:200]}); full log: {log}")
        legs = f" ({earlier:.0f} s of them in interrupted legs)" if resumed else ""
        print(f"[bench] {name}: {seconds:.0f} s{legs}", file=sys.stderr)
        run = f"{key}/{uuid.uuid4().hex}"  # what later stages depend on: this very run of the stage
        record_path.write_text(json.dumps({"key": key, "run": run, "command": command, "status": "done",
                                           "seconds": seconds}) + "\n")
        self.seconds[name], self.runs[name] = seconds, run


def stages(args: argparse.Namespace) -> tuple[Path, dict[str, str], Runner]:
    """The working folder, the steps' environment (offline; --threads as OMP_NUM_THREADS) and their Runner."""
    out = Path(args.out).resolve()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return out, env, Runner(out=out, env=env)


def python(*args: object) -> list[str]:
    return [sys.executable, *map(str, args)]


def labelled_subset(tree: Path, out: Path, per_class: int, seed: int) -> Path:
    """An IRMAS-train tree of `per_class` clips per class, linked to `tree`'s files, whole songs first.

    Songs are taken in a seeded order, so the subsets for growing `per_class` are nested; the last song of a
    class may lose excerpts to hit the count exactly. The links keep the original names, so the parsers read
    the same labels, genres and songs.
    """
    songs: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for record in scan("irmas-train", tree).records:
        songs[record.instruments[0]][record.song].append(record.relpath)
    root = out / TRAIN_DIR
    if root.exists():
        shutil.rmtree(root)
    for code, by_song in sorted(songs.items()):
        order = sorted(by_song)
        random.Random(f"{seed}/subset/{code}").shuffle(order)
        for relpath in [path for song in order for path in sorted(by_song[song])][:per_class]:
            link = root / relpath
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((tree / relpath).resolve())
    return root


def machine(env: dict[str, str]) -> dict:
    """What the numbers were measured on; OMP_NUM_THREADS as the steps saw it (unset: torch uses every core)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "platform": platform.platform()}


# --- The benchmark -----------------------------------------------------------------------------


def test_sets(runner: Runner, data: Path, shards: Path, *, fonts: dict[str, list[Path]], files: int, seed: int
              ) -> tuple[dict[str, Path], dict[str, str]]:
    """The same `files` polyphonic test pieces (`seed`) rendered and packed once per score prefix ("" for the unseen
    font, "same_font_" for the training fonts): (prefix -> test shards, prefix -> the stage that writes them)."""
    tests, packed = {}, {}
    for prefix, prefix_fonts in fonts.items():
        name = "test-train-fonts" if prefix else "test-unseen-font"
        runner.run(f"synth-{name}", python("-m", "shards", "synth", data / name, "--train-per-class", 0,
                                           "--test-files", files, "--unlabeled", 0, "--seed", seed,
                                           "--soundfont", *prefix_fonts, "--quiet"),
                   output=data / name, done=data / name / "synth.json", files=tuple(prefix_fonts))
        runner.run(f"pack-{name}", python("-m", "shards", "pack", "irmas-test", data / name / TEST_DIR, shards / name,
                                          "--quiet"),
                   output=shards / name, done=shards / name / MANIFEST, after=(f"synth-{name}",))
        tests[prefix], packed[prefix] = shards / name / "test", f"pack-{name}"
    return tests, packed


def run_bench(args: argparse.Namespace) -> dict:
    preset = BUDGETS[args.budget]
    budget = dataclasses.replace(preset, **{name: value for name, value in (
        ("pretrain_steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps),
        ("probe_steps", args.probe_steps), ("seeds", tuple(args.seeds) if args.seeds else None),
        ("unlabeled", args.unlabeled)) if value is not None})
    objectives = args.objectives
    for objective in objectives:
        if objective not in (*OBJECTIVES, SYNTH_LABELS):
            raise UserError(f"--objectives: unknown objective {objective!r}; choose from "
                            f"{', '.join((*OBJECTIVES, SYNTH_LABELS))}")
    self_supervised = [name for name in objectives if name != SYNTH_LABELS]
    out, env, runner = stages(args)
    started = time.perf_counter()
    data, shards = out / "data", out / "shards"
    main_n, largest, seed = budget.main_per_class, max(budget.labelled_per_class), args.seed

    # 1-2. Data: labelled clips with one SoundFont, the unlabeled pool with several, the test with none of them.
    train_font, test_font = Path(args.train_soundfont).resolve(), Path(args.test_soundfont).resolve()
    pool_fonts = [Path(font).resolve() for font in args.pool_soundfonts]
    if test_font == train_font or test_font in pool_fonts:
        raise UserError(f"--test-soundfont: {test_font} is also a training or pool SoundFont; the test needs another")
    train_tree, pool_tree = data / "train-font", data / "pool"
    runner.run("synth-train", python("-m", "shards", "synth", train_tree, "--train-per-class", largest,
                                     "--test-files", 0, "--unlabeled", 0, "--seed", seed,
                                     "--soundfont", train_font, "--quiet"),
               output=train_tree, done=train_tree / "synth.json", files=(train_font,))
    runner.run("synth-pool", python("-m", "shards", "synth", pool_tree, "--train-per-class", 0, "--test-files", 0,
                                    "--unlabeled", budget.unlabeled, "--seed", seed + 2, "--soundfont", *pool_fonts,
                                    "--quiet"),
               output=pool_tree, done=pool_tree / "synth.json", files=tuple(pool_fonts))
    runner.run("pack-unlabeled", python("-m", "shards", "pack", "folder", pool_tree / "unlabeled",
                                        shards / "unlabeled", "--segment-seconds", 3, "--quiet"),
               output=shards / "unlabeled", done=shards / "unlabeled" / MANIFEST, after=("synth-pool",))
    labelled: dict[int, Path] = {}
    for n in budget.labelled_per_class:
        source = train_tree / TRAIN_DIR if n == largest else labelled_subset(train_tree / TRAIN_DIR,
                                                                              data / f"labelled-{n}", n, seed)
        labelled[n] = shards / f"labelled-{n}"
        runner.run(f"pack-labelled-{n}", python("-m", "shards", "pack", "irmas-train", source, labelled[n],
                                                "--val-fraction", VAL_FRACTION, "--seed", seed, "--quiet"),
                   output=labelled[n], done=labelled[n] / MANIFEST, after=("synth-train",))
    # The same test pieces rendered with the labelled set's SoundFont too: what the unseen timbres cost.
    tests, packed = test_sets(runner, data, shards, fonts={"": [test_font], "same_font_": [train_font]},
                              files=budget.test_files, seed=seed + 1)
    # An unlabeled collection in the test's font (other pieces: seed + 3) that `finetune calibrate` reads.
    collection, collection_files = data / "calibration", max(budget.test_files, MIN_FILES)
    runner.run("synth-calibration", python("-m", "shards", "synth", collection, "--train-per-class", 0,
                                           "--test-files", collection_files, "--unlabeled", 0, "--seed", seed + 3,
                                           "--soundfont", test_font, "--quiet"),
               output=collection, done=collection / "synth.json", files=(test_font,))

    # 3. Pretraining: every objective's recipe, the same backbone size, data, steps and batch.
    pretrain_data, pretrain_after = [str(shards / "unlabeled" / "train")], ("pack-unlabeled",)
    if args.pretrain_data == "both":
        pretrain_data.append(str(labelled[main_n] / "train"))
        pretrain_after += (f"pack-labelled-{main_n}",)
    pretrained: dict[str, dict] = {}
    for objective in self_supervised:
        run_dir, recipe = out / "pretrain" / objective, RECIPES / "pretrain" / f"{objective}-tiny-synth.yaml"
        runner.run(f"pretrain-{objective}", python(
            "-m", "pretrain", recipe, f"model.size={budget.size}",
            f"data.train={json.dumps(pretrain_data)}", f"train.steps={budget.pretrain_steps}",
            f"train.batch_size={budget.pretrain_batch}", f"train.seed={seed}",
            f"train.checkpoint_every={max(1, budget.pretrain_steps // PRETRAIN_CHECKPOINTS)}", "train.image_every=0",
            f"train.log_every={max(1, budget.pretrain_steps // 20)}", "tracking=tensorboard", "resume=auto",
            f"probe.train={labelled[main_n] / 'train'}", f"probe.val={labelled[main_n] / 'val'}",
            f"run_name=bench-{objective}", f"output_dir={run_dir}"),
            output=run_dir, done=run_dir / "backbone" / "config.json",
            after=(*pretrain_after, f"pack-labelled-{main_n}"), files=(recipe,))
        state = json.loads((run_dir / "trainer_state.json").read_text())
        pretrained[objective] = {"backbone": run_dir / "backbone", "clips_per_s": state["clips_per_s"],
                                 "steps": state["step"], "seconds": runner.seconds[f"pretrain-{objective}"],
                                 "loss_curve": curve_of(run_dir, "loss"),
                                 "probe_curve": curve_of(run_dir, "val/probe_lrap")}
    if SYNTH_LABELS in objectives:
        pretrained[SYNTH_LABELS] = synth_labels(runner, out, budget, pool_fonts, seed, tests, packed,
                                                Path(args.finetune_recipe).resolve())

    # 4-5. Fine-tune / probe each backbone (and scratch) and evaluate on the test shards.
    def finetune(kind: str, name: str, n: int, run_seed: int, *, same_font: bool = False) -> dict:
        recipe = Path(args.finetune_recipe if kind == "finetune" else args.probe_recipe).resolve()
        backbone = pretrained[name]["backbone"] if name in pretrained else None
        train, val = str(labelled[n] / "train"), str(labelled[n] / "val")
        if name == SYNTH_LABELS and kind == "finetune":
            start = (f"init_from={pretrained[name]['model']}", *SYNTH_LABELS_FINETUNE)
            train = json.dumps(rehearsal(labelled[n], pretrained[name]["shards"], SYNTH_LABELS_REHEARSAL))
            val = json.dumps([val, str(pretrained[name]["shards"] / "val")])
        else:
            # The objectives pretrain non-overlapping patches (the teacher and ELECTRA need them); the recipe's stride 4
            # re-grids them to its overlapping ones (positions resampled) and they train with its patchout, as scratch
            # does (twenty-ninth session: MAE +0.022 macro F1, +0.025 LRAP, +0.056 mAP against its own stride-16
            # patches without patchout, seeds 0-2; bench/quality_notes.md).
            start = (f"backbone={backbone}",) if backbone else (f"model.size={budget.size}",)
        steps, batch = ((budget.finetune_steps, budget.finetune_batch) if kind == "finetune"
                        else (budget.probe_steps, budget.probe_batch))
        stage = f"{kind}-{name}-{n}-seed{run_seed}"
        run_dir = out / kind / stage.removeprefix(f"{kind}-")
        augment = FEW_LABELS_FINETUNE if kind == "finetune" else ()  # the probe: frozen features, its own recipe
        command = python("-m", "finetune", recipe, *start, *augment, f"data.train={train}", f"data.val={val}",
                         f"train.steps={steps}", f"train.batch_size={batch}", f"train.seed={run_seed}",
                         f"train.checkpoint_every={max(1, steps // VALIDATIONS)}", f"train.log_every={max(1, steps // 4)}",
                         "tracking=none", "resume=auto", f"run_name=bench-{stage}", f"output_dir={run_dir}")
        runner.run(stage, command, output=run_dir, done=run_dir / "model" / "finetune.json",
                   after=(f"pack-labelled-{n}", *([f"pretrain-{name}"] if backbone else [])), files=(recipe,))
        scores = evaluate(runner, out, stage, [run_dir / "model"], tests if same_font else {"": tests[""]}, packed,
                          after=(stage,))
        if same_font:  # the main table's fine-tunes: also calibrated to the unlabeled collection, then evaluated
            calibrated = out / "calibrated" / stage
            runner.run(f"calibrate-{stage}", python("-m", "finetune", "calibrate", run_dir / "model",
                                                    collection / TEST_DIR, "--out", calibrated),
                       output=calibrated, done=calibrated / "finetune.json", after=(stage, "synth-calibration"),
                       fresh=True)
            scores |= evaluate(runner, out, stage, [calibrated], {"calibrated_": tests[""]},
                               {"calibrated_": packed[""]}, after=(f"calibrate-{stage}",))
        return scores

    rows: dict[str, dict] = {}
    for name in ("scratch", *objectives):
        runs = {run_seed: finetune("finetune", name, main_n, run_seed, same_font=True) for run_seed in budget.seeds}
        # the seeds' fine-tunes as one model (mean file probabilities and thresholds) on the unseen font
        seeds = [f"finetune-{name}-{main_n}-seed{run_seed}" for run_seed in budget.seeds]
        ensemble = evaluate(runner, out, f"ensemble-{name}-{main_n}",
                            [out / "finetune" / stage.removeprefix("finetune-") / "model" for stage in seeds],
                            {"": tests[""]}, packed, after=tuple(seeds)) if len(seeds) > 1 else None
        probe = finetune("probe", name, main_n, budget.seeds[0])
        rows[name] = {**spread(runs.values(), ROW_SCORES), "runs": runs,
                      "ensemble": ensemble and {key: ensemble[key] for key in ("macro_f1", "lrap", "map")},
                      "probe": {key: probe[key] for key in ("macro_f1", "lrap", "map")},
                      **({key: pretrained[name][key] for key in ("clips_per_s", "seconds", "steps", "loss_curve",
                                                                 "probe_curve", "zero_shot") if key in pretrained[name]}
                         if name in pretrained else {})}

    # Label efficiency: scratch against the best self-supervised objective (by mean fine-tuned macro F1 at the main
    # budget) and synth-labels.
    best = max(self_supervised, key=lambda name: rows[name]["macro_f1"]["mean"]) if self_supervised else None
    curve: dict[str, list[dict]] = {}
    for name in [name for name in ("scratch", best, SYNTH_LABELS) if name in rows]:
        curve[name] = [rows[name]["macro_f1"] if n == main_n else spread(
            [finetune("finetune", name, n, run_seed) for run_seed in budget.seeds], ("macro_f1",))["macro_f1"]
            for n in budget.labelled_per_class]

    sticks = supervised_yardsticks(labelled[main_n] / "train", labelled[main_n] / "val", tests,
                                   Path(args.finetune_recipe).resolve())
    unlabeled_rows = [rows[name] for name in ("scratch", *self_supervised)]
    targets = {"best_objective": best, "best_macro_f1": max(row["macro_f1"]["mean"] for row in unlabeled_rows),
               "best_calibrated_macro_f1": max(row["calibrated_macro_f1"]["mean"] for row in unlabeled_rows)}
    if best:
        targets |= against_scratch(rows[best], rows["scratch"], sticks[REGRESSION])
    if SYNTH_LABELS in rows:
        targets["synth_labels"] = against_scratch(rows[SYNTH_LABELS], rows["scratch"], sticks[REGRESSION])
    result = {
        "budget": args.budget, "sizes": dataclasses.asdict(budget), "seed": seed, "test_seed": seed + 1,
        "pool_seed": seed + 2, "objectives": list(objectives), "pretrain_data": args.pretrain_data,
        "train_soundfont": str(train_font), "pool_soundfonts": [str(font) for font in pool_fonts],
        "test_soundfont": str(test_font), "rows": rows, "targets": targets, "yardsticks": sticks,
        "label_efficiency": {"labelled_per_class": list(budget.labelled_per_class), **curve},
        "wall_seconds": round(time.perf_counter() - started, 1),  # this invocation (stages done earlier skipped)
        "stages_seconds": round(sum(runner.seconds.values()), 1),  # every stage, as recorded when it ran
        "stage_seconds": {name: round(seconds, 1) for name, seconds in runner.seconds.items()},
        "machine": machine(env), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "out": str(out),
    }
    notes = Path(args.notes).read_text() if args.notes else None
    write_results(result, runner.commands, notes, out / "RESULTS.md", out / "label_efficiency.png")
    if args.write_results:
        write_results(result, runner.commands, notes, BENCH / "RESULTS.md", BENCH / "quality_label_efficiency.png")
    return result


def synth_labels(runner: Runner, out: Path, budget: Budget, fonts: list[Path], seed: int, tests: dict[str, Path],
                 packed: dict[str, str], recipe: Path) -> dict:
    """The synth-labels backbone: labelled clips rendered in the pool's `fonts` (another seed than every other set),
    packed with a song-grouped validation split, and the fine-tuning `recipe` trained on them for the budget's
    synth_labels_steps x pretrain_batch, validated PRETRAIN_CHECKPOINTS times; its model is also evaluated as it is,
    before it sees a labelled clip of the user's (zero_shot)."""
    tree, packs, run_dir = out / "data" / SYNTH_LABELS, out / "shards" / SYNTH_LABELS, out / "pretrain" / SYNTH_LABELS
    runner.run(f"synth-{SYNTH_LABELS}", python(
        "-m", "shards", "synth", tree, "--train-per-class", budget.synth_labels_per_class, "--test-files", 0,
        "--unlabeled", 0, "--seed", seed + 4, "--soundfont", *fonts, "--quiet"),
        output=tree, done=tree / "synth.json", files=tuple(fonts))
    runner.run(f"pack-{SYNTH_LABELS}", python("-m", "shards", "pack", "irmas-train", tree / TRAIN_DIR, packs,
                                              "--val-fraction", SYNTH_LABELS_VAL_FRACTION, "--seed", seed, "--quiet"),
               output=packs, done=packs / MANIFEST, after=(f"synth-{SYNTH_LABELS}",))
    steps = budget.synth_labels_steps
    runner.run(f"pretrain-{SYNTH_LABELS}", python(
        "-m", "finetune", recipe, f"model.size={budget.size}", f"data.train={packs / 'train'}",
        f"data.val={packs / 'val'}", f"train.steps={steps}", f"train.batch_size={budget.pretrain_batch}",
        f"train.seed={seed}", f"train.checkpoint_every={max(1, steps // PRETRAIN_CHECKPOINTS)}",
        f"train.log_every={max(1, steps // 20)}", "tracking=tensorboard", "resume=auto",
        f"run_name=bench-{SYNTH_LABELS}", f"output_dir={run_dir}"),
        output=run_dir, done=run_dir / "model" / "finetune.json", after=(f"pack-{SYNTH_LABELS}",), files=(recipe,))
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {"backbone": run_dir / "model" / "backbone", "model": run_dir / "model", "shards": packs,
            "clips_per_s": state["clips_per_s"], "steps": state["step"],
            "seconds": runner.seconds[f"pretrain-{SYNTH_LABELS}"],
            "loss_curve": curve_of(run_dir, "loss"), "probe_curve": curve_of(run_dir, "val/lrap"),
            "zero_shot": evaluate(runner, out, SYNTH_LABELS, [run_dir / "model"], tests, packed,
                                  after=(f"pretrain-{SYNTH_LABELS}",))}


def rehearsal(labelled: Path, rendered: Path, share: float) -> list[str]:
    """The synth-labels fine-tunes' training shards: the `labelled` training split, listed as often as makes it about
    `share` of the examples, and the `rendered` clips' training split (both packs' manifests give the counts)."""
    def count(packs: Path) -> int:
        return json.loads((packs / MANIFEST).read_text())["splits"]["train"]["samples"]

    repeats = max(1, round(share / (1 - share) * count(rendered) / count(labelled)))
    return [str(labelled / "train")] * repeats + [str(rendered / "train")]


def against_scratch(row: dict, scratch: dict, regression: dict) -> dict:
    """The issue's targets for one fine-tuned row: its macro F1 gain over scratch (counted where it exceeds 2 std of
    the noisier row), its own macro F1, and its frozen probe against the log-mel regression."""
    gain = row["macro_f1"]["mean"] - scratch["macro_f1"]["mean"]
    noise = 2 * max(row["macro_f1"]["std"], scratch["macro_f1"]["std"])
    probe_beats = all(row["probe"][key] > regression[key] for key in ("macro_f1", "lrap"))
    return {"gain": gain, "two_std": noise, "gain_counts": gain > noise, "probe_beats_regression": probe_beats,
            "met": gain >= TARGET_MARGIN and gain > noise and row["macro_f1"]["mean"] >= TARGET_MACRO_F1
            and probe_beats}


def spread(runs, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof 1; 0 for a single run) over runs (dicts of scores) of each key."""
    runs = list(runs)
    ddof = 1 if len(runs) > 1 else 0
    return {key: {"mean": float(np.mean([run[key] for run in runs])),
                  "std": float(np.std([run[key] for run in runs], ddof=ddof))} for key in keys}


def evaluate(runner: Runner, out: Path, label: str, models: list[Path], tests: dict[str, Path], packed: dict[str, str],
             *, after: tuple[str, ...]) -> dict[str, float]:
    """`finetune evaluate` of `models` (one, or several as their ensemble; written by the stages `after`) on each test
    set (prefix -> shards, written by stage packed[prefix]), one stage each (evaluate-<prefix>label); the headline
    scores with their prefix."""
    scores = {}
    for prefix, test_data in tests.items():
        stage = f"evaluate-{prefix.replace('_', '-')}{label}"
        report_dir = out / "evaluate" / stage.removeprefix("evaluate-")
        runner.run(stage, python("-m", "finetune", "evaluate", *models, test_data, "--out", report_dir),
                   output=report_dir, done=report_dir / "report.json", after=(*after, packed[prefix]))
        report = json.loads((report_dir / "report.json").read_text())
        scores |= {prefix + key: report[key] for key in HEADLINE}
    return scores


def curve_of(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar a pretraining run logged to TensorBoard ("loss", "val/probe_lrap")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("tensorboard/**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points |= {event.step: round(event.value, 5) for event in accumulator.Scalars(tag)}
    return sorted(points.items())


# --- The supervised table ----------------------------------------------------------------------

SUPERVISED_SIZES = {"tiny": {"per_class": 4, "test_files": 6, "steps": 4}, "full": {"per_class": 1000, "test_files": 200}}
SUPERVISED_SCORES = HEADLINE


def run_supervised(args: argparse.Namespace) -> dict:
    """Scratch ViT (the shipped CPU recipe, one run per seed) against the yardsticks, unseen-font and same-font."""
    sizes = SUPERVISED_SIZES[args.budget]
    out, env, runner = stages(args)
    started = time.perf_counter()
    data, shards, seed = out / "data", out / "shards", args.seed
    train_fonts = [Path(font).resolve() for font in args.train_soundfonts]
    test_font = Path(args.test_soundfont).resolve()
    if test_font in train_fonts:
        raise UserError(f"--test-soundfont: {test_font} is also a training SoundFont; the test set needs another")
    recipe = Path(args.finetune_recipe).resolve()
    runner.run("synth-train", python("-m", "shards", "synth", data / "train", "--train-per-class", sizes["per_class"],
                                     "--test-files", 0, "--unlabeled", 0, "--seed", seed, "--soundfont", *train_fonts,
                                     "--quiet"),
               output=data / "train", done=data / "train" / "synth.json", files=tuple(train_fonts))
    runner.run("pack-train", python("-m", "shards", "pack", "irmas-train", data / "train" / TRAIN_DIR,
                                    shards / "train", "--val-fraction", VAL_FRACTION, "--seed", seed, "--quiet"),
               output=shards / "train", done=shards / "train" / MANIFEST, after=("synth-train",))
    tests, packed = test_sets(runner, data, shards, fonts={"": [test_font], "same_font_": train_fonts},
                              files=sizes["test_files"], seed=seed + 1)
    runs = {}
    for run_seed in args.seeds:
        run_dir = out / "finetune" / f"scratch-seed{run_seed}"
        steps = [f"train.steps={sizes['steps']}", "train.checkpoint_every=2"] if "steps" in sizes else []
        runner.run(f"finetune-seed{run_seed}", python(
            "-m", "finetune", recipe, f"data.train={shards / 'train' / 'train'}", f"data.val={shards / 'train' / 'val'}",
            f"train.seed={run_seed}", *steps, "tracking=none", "resume=auto", f"output_dir={run_dir}"),
            output=run_dir, done=run_dir / "model" / "finetune.json", after=("pack-train",), files=(recipe,))
        scores = evaluate(runner, out, f"seed{run_seed}", [run_dir / "model"], tests, packed,
                          after=(f"finetune-seed{run_seed}",))
        state = json.loads((run_dir / "trainer_state.json").read_text())
        runs[run_seed] = {**scores, "steps": state["step"], "clips_per_s": state["clips_per_s"],
                          "seconds": runner.seconds[f"finetune-seed{run_seed}"]}
    scratch = spread(runs.values(), tuple(prefix + key for prefix in tests for key in SUPERVISED_SCORES))
    sticks = supervised_yardsticks(shards / "train" / "train", shards / "train" / "val", tests, recipe)
    regression = sticks[REGRESSION]
    beats = {prefix or "unseen_font_": all(scratch[prefix + key]["mean"] > regression[prefix + key]
                                           for key in ("macro_f1", "lrap")) for prefix in tests}
    result = {
        "table": "supervised", "budget": args.budget, "sizes": sizes, "seed": seed, "test_seed": seed + 1,
        "seeds": list(args.seeds), "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "train_soundfonts": [str(font) for font in train_fonts], "test_soundfont": str(test_font),
        "scratch": scratch, "runs": runs, "yardsticks": sticks, "scratch_beats_regression": beats,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {name: round(seconds, 1) for name, seconds in runner.seconds.items()},
        "machine": machine(env), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "out": str(out),
    }
    write_supervised(result, runner.commands, out / "RESULTS-supervised.md")
    if args.write_results:
        write_supervised(result, runner.commands, BENCH / "RESULTS-supervised.md")
    return result


def supervised_yardsticks(train: Path, val: Path, tests: dict[str, Path], recipe: Path) -> dict[str, dict]:
    """The two yardsticks of `finetune yardsticks` (thresholds tuned on the validation sets, and windows aggregated
    per file, as the fine-tuning `recipe`'s models do)."""
    evaluation = load_recipe(recipe, [], FinetuneRecipe).eval
    rows: dict[str, dict] = {}
    for prefix, test in tests.items():
        for name, scores in yardsticks(str(train), str(val), str(test), aggregate=evaluation.aggregate,
                                       thresholds=evaluation.threshold_sets).items():
            rows.setdefault(name, {}).update({prefix + key: scores[key] for key in SUPERVISED_SCORES})
    return rows


def write_supervised(result: dict, commands: list[tuple[str, str]], path: Path) -> None:
    host, out, seeds = result["machine"], result["out"], result["seeds"]
    columns = [(prefix, key) for prefix in ("", "same_font_") for key in SUPERVISED_SCORES]
    header = " | ".join(("unseen font " if not prefix else "training fonts ") + key.replace("_", " ")
                        for prefix, key in columns)
    lines = [
        "# Supervised table: a scratch ViT against the yardsticks", "",
        f"Generated by `bench/quality.py --table supervised --budget {result['budget']}` on {result['date']}. "
        f"`{result['recipe']}` (no pretraining) trained on {result['sizes']['per_class']} clips per class rendered "
        f"with {', '.join(Path(f).name for f in result['train_soundfonts'])} ("
        + ("one font drawn per clip, " if len(result["train_soundfonts"]) > 1 else "")
        + f"{int(VAL_FRACTION * 100)}% of the songs held out for validation and thresholds), one run per seed "
        f"({', '.join(map(str, seeds))}); tested on {result['sizes']['test_files']} polyphonic files rendered with "
        f"{Path(result['test_soundfont']).name}, a font the training never heard, and on the same pieces rendered "
        "with the training fonts.", "",
        f"| model | {header} |", "|---|" + "---|" * len(columns),
        f"| scratch ViT, mean +- std of {len(seeds)} | " + " | ".join(
            f"{result['scratch'][p + k]['mean']:.3f} +- {result['scratch'][p + k]['std']:.3f}" for p, k in columns) + " |",
    ]
    lines += [f"| scratch ViT, seed {s} | " + " | ".join(f"{run[p + k]:.3f}" for p, k in columns) + " |"
              for s, run in result["runs"].items()]
    lines += [f"| *{name}* | " + " | ".join(f"{row[p + k]:.3f}" for p, k in columns) + " |"
              for name, row in result["yardsticks"].items()]
    beats = result["scratch_beats_regression"]
    lines += ["", "Scratch ViT above the log-mel regression on macro F1 and LRAP (means): unseen font "
              f"**{'yes' if beats['unseen_font_'] else 'no'}**, training fonts "
              f"**{'yes' if beats['same_font_'] else 'no'}**.", "",
              f"- Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']} "
              f"(OMP_NUM_THREADS={host['omp_num_threads'] or 'unset'}), Python {host['python']}.",
              "- Fine-tuning: " + ", ".join(f"seed {s}: {r['steps']} steps, {r['clips_per_s']:.0f} clips/s, "
                                            f"{r['seconds'] / 60:.1f} min" for s, r in result["runs"].items()) + ".",
              "", "## Commands", "", "```", result["command"].replace(sys.executable, "python"), "```", "",
              f"Each step, as run (OUT = `{out}`):", "", "```"]
    lines += [f"# {name}\n{shown.replace(out, 'OUT').replace(sys.executable, 'python')}" for name, shown in commands]
    lines += ["```", "", "## Stage wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in result["stage_seconds"].items()]
    path.write_text("\n".join(lines) + "\n")


# --- Results ---------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["label_efficiency"]
    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for name in [key for key in curve if key != "labelled_per_class"]:
        axes.errorbar(curve["labelled_per_class"], [point["mean"] for point in curve[name]],
                      yerr=[point["std"] for point in curve[name]], marker="o", capsize=4,
                      label=name if name == "scratch" else f"pretrained ({name})")
    axes.set_xticks(curve["labelled_per_class"])
    axes.set_xlabel("labelled clips per class (train + val), one SoundFont")
    axes.set_ylabel("macro F1, unseen-SoundFont test")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"Label efficiency (mean +- std of {len(result['sizes']['seeds'])} seeds)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_results(result: dict, commands: list[tuple[str, str]], notes: str | None, path: Path, png: Path) -> None:
    """RESULTS.md (with `notes`, the hand-written record of what was tried) and the label-efficiency plot."""
    plot(result, png)
    sizes, host, targets, out = result["sizes"], result["machine"], result["targets"], result["out"]
    seeds = ", ".join(map(str, sizes["seeds"]))

    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def cell(value: dict | float | None) -> str:  # a number, or {"mean", "std"} over seeds
        return number(value) if not isinstance(value, dict) else f"{value['mean']:.3f} +- {value['std']:.3f}"

    def against_regression(name: str) -> str:  # a backbone's probe next to the log-mel regression
        probe, regression = result["rows"][name]["probe"], result["yardsticks"][REGRESSION]
        return (f"(macro F1 {probe['macro_f1']:.3f} against {regression['macro_f1']:.3f}, LRAP {probe['lrap']:.3f} "
                f"against {regression['lrap']:.3f})")

    lines = [
        "# Quality benchmark: does pretraining on unlabeled audio pay where labels are few?", "",
        f"Generated by `bench/quality.py --budget {result['budget']}` on {result['date']} "
        f"(its stages took {result['stages_seconds'] / 60:.1f} min on this machine).", "",
        f"Labelled: {sizes['main_per_class']} clips per class (train + val, {int(VAL_FRACTION * 100)}% of the songs "
        f"held out for validation and thresholds) rendered with one SoundFont ({Path(result['train_soundfont']).name})."
        f" Unlabeled pool: {sizes['unlabeled']} clips of 3-12 s, each rendered with one of "
        f"{', '.join(Path(font).name for font in result['pool_soundfonts'])}, cut into 3 s segments. Test: "
        f"{sizes['test_files']} polyphonic files rendered with {Path(result['test_soundfont']).name}, a font in "
        "neither set. Backbone size "
        f"`{sizes['size']}` everywhere; every fine-tune runs the same recipe, with the waveform augmentation "
        f"({' '.join(FEW_LABELS_FINETUNE)}), with seeds {seeds} (mean +- sample std); the probe (a linear head on mean "
        f"patch tokens of the frozen backbone) runs seed {sizes['seeds'][0]}.", "",
        "The same-font columns score the same fine-tuned models on the same test pieces rendered with the labelled "
        "set's font. The yardsticks (`python -m finetune yardsticks`) use no ViT: *no information* predicts every "
        "instrument (F1) or ranks at random (LRAP, mAP); the regression is one logistic regression per instrument "
        "on log-mel means and deviations.", "",
        "The calibrated columns score the same fine-tuned models after `python -m finetune calibrate` (match "
        "`pooled`) moved their thresholds to an unlabeled collection of other pieces in the test's font "
        f"({max(sizes['test_files'], MIN_FILES)} files, seed {result['seed'] + 3}); scores, so LRAP and mAP, do not "
        "change.", "",
        "The ensemble column scores each row's fine-tunes of every seed as one model on the unseen font (`python -m "
        "finetune evaluate` given all of them: mean file probabilities, mean thresholds), macro F1 / LRAP / mAP.", "",
        "| backbone | fine-tune macro F1 | micro F1 | LRAP | mAP | same-font macro F1 | same-font LRAP "
        "| calibrated macro F1 | calibrated micro F1 | seeds' ensemble | probe macro F1 | probe LRAP "
        "| pretraining clips/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        ensemble = " / ".join(number(row["ensemble"][key]) for key in ("macro_f1", "lrap", "map")) \
            if row.get("ensemble") else "-"
        lines.append(f"| {name} | " + " | ".join(cell(row[key]) for key in ROW_SCORES)
                     + f" | {ensemble} | {number(row['probe']['macro_f1'])} | {number(row['probe']['lrap'])} | "
                     f"{number(row.get('clips_per_s'), 1)} |")
    for name, row in result["yardsticks"].items():
        lines.append(f"| *{name}* | " + " | ".join(number(row.get(key)) for key in ROW_SCORES) + " | - | - | - | - |")
    curve = result["label_efficiency"]
    lines += ["", f"![label efficiency]({png.name})", "",
              "| fine-tune macro F1, labelled clips per class | "
              + " | ".join(map(str, curve["labelled_per_class"])) + " |",
              "|---|" + "---|" * len(curve["labelled_per_class"])]
    lines += [f"| {name} | " + " | ".join(cell(point) for point in points) + " |"
              for name, points in curve.items() if name != "labelled_per_class"]
    best = targets["best_objective"]
    lines += ["", "## Targets", ""]
    if best:
        lines += [
            f"- Best objective `{best}` - scratch: {targets['gain']:+.3f} macro F1 (target >= {TARGET_MARGIN:.2f}); "
            f"2 std of the noisier of the two: {targets['two_std']:.3f}, so the gain "
            f"**{'counts' if targets['gain_counts'] else 'does not count'}**.",
            f"- Best fine-tuned macro F1: {targets['best_macro_f1']:.3f} (target >= {TARGET_MACRO_F1:.2f}); with "
            f"thresholds calibrated on the unlabeled collection: {targets['best_calibrated_macro_f1']:.3f}.",
            f"- Probe of `{best}` above the log-mel regression on macro F1 and LRAP: "
            f"**{'yes' if targets['probe_beats_regression'] else 'no'}** {against_regression(best)}.",
            f"- All targets: **{'met' if targets['met'] else 'not met'}**.",
        ]
    else:
        lines += ["- No self-supervised objective was run: scratch only."]
    synthetic = targets.get("synth_labels")
    if synthetic:
        row, zero = result["rows"][SYNTH_LABELS], result["rows"][SYNTH_LABELS]["zero_shot"]
        lines += [
            "", f"`{SYNTH_LABELS}` is not pretraining on unlabeled audio, so it is kept out of the targets above: "
            f"its backbone learnt from {sizes['synth_labels_per_class']} labelled clips per class that the synth "
            f"rendered in the pool's fonts (labels from the renderer), for {sizes['synth_labels_steps']} steps x "
            f"{sizes['pretrain_batch']} (the demo's; the objectives' {sizes['pretrain_steps']} would stop it while its "
            "validation curve below still climbs), "
            "and its fine-tunes continue its model, head included (`init_from`, learning rate "
            f"{SYNTH_LABELS_FINETUNE[-1].split('=')[1]}), on the labelled clips with the rendered ones mixed in (the "
            f"labelled ~{SYNTH_LABELS_REHEARSAL:.0%} of the examples) and thresholds tuned on both validation splits.",
            f"- `{SYNTH_LABELS}` - scratch: {synthetic['gain']:+.3f} macro F1 (2 std {synthetic['two_std']:.3f}: "
            f"**{'counts' if synthetic['gain_counts'] else 'does not count'}**); its macro F1 "
            f"{row['macro_f1']['mean']:.3f}, calibrated {row['calibrated_macro_f1']['mean']:.3f}; probe above the "
            f"regression: **{'yes' if synthetic['probe_beats_regression'] else 'no'}** "
            f"{against_regression(SYNTH_LABELS)}; all targets: "
            f"**{'met' if synthetic['met'] else 'not met'}**.",
            f"- Its model before any of the labelled clips (no fine-tuning): macro F1 / LRAP / mAP "
            f"{zero['macro_f1']:.3f} / {zero['lrap']:.3f} / {zero['map']:.3f} on the unseen font, "
            f"{zero['same_font_macro_f1']:.3f} / {zero['same_font_lrap']:.3f} / {zero['same_font_map']:.3f} on the "
            "labelled set's font.",
        ]
    lines += ["", "GPU: this benchmark runs on CPU; the base recipes on a GPU are in bench/RESULTS-gpu.md.", "",
              "## Pretraining", "",
              "How each objective's run went: its loss at a quarter, half, three quarters and the end of the run, and the "
              "frozen-feature probe (`pretrain.probe`: a logistic regression on mean patch tokens, fit on the labelled "
              "training split, LRAP on its validation clips) at every checkpoint, from step 0 (the random initialisation "
              f"every objective starts from) on; for `{SYNTH_LABELS}`, the "
              "validation LRAP of its own held-out rendered clips instead.", "",
              "| objective | steps | minutes | loss at 1/4, 1/2, 3/4, end | probe LRAP (step: value) |",
              "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        if "loss_curve" in row:
            losses = [loss for _, loss in row["loss_curve"]]
            marks = [losses[min(len(losses) - 1, round(q * len(losses)) - 1)] for q in (0.25, 0.5, 0.75, 1.0)] \
                if losses else []
            lines.append(f"| {name} | {row['steps']} | {row['seconds'] / 60:.1f} | "
                         + ", ".join(f"{loss:.4f}" for loss in marks) + " | "
                         + ", ".join(f"{step}: {value:.3f}" for step, value in row["probe_curve"]) + " |")
    lines += [
        "", "## Setup", "",
        f"- Seeds: data {result['seed']} (labelled), {result['pool_seed']} (pool), {result['test_seed']} (test); "
        f"pretraining {result['seed']}; fine-tuning {seeds}.",
        f"- Pretraining: {sizes['pretrain_steps']} steps x {sizes['pretrain_batch']} clips per objective "
        "(recipes/pretrain/<objective>-tiny-synth.yaml with the size above) on the pool"
        + (" plus the labelled training split" if result["pretrain_data"] == "both" else "")
        + (f"; {SYNTH_LABELS}: {sizes['synth_labels_steps']} x {sizes['pretrain_batch']}" if synthetic else "")
        + f"; fine-tuning: {sizes['finetune_steps']} x {sizes['finetune_batch']}; probe: {sizes['probe_steps']} x "
        f"{sizes['probe_batch']}.",
        f"- Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']} "
        f"(OMP_NUM_THREADS={host['omp_num_threads'] or 'unset'}), Python {host['python']}, {host['platform']}.",
        "", "## Commands", "", "```", result["command"].replace(sys.executable, "python"), "```", "",
        f"Each step, as run (OUT = `{out}`):", "", "```",
    ]
    lines += [f"# {name}\n{shown.replace(out, 'OUT').replace(sys.executable, 'python')}"
              for name, shown in commands]
    lines += ["```", "", "## Stage wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in result["stage_seconds"].items()]
    if notes:
        lines += ["", "## What was tried", "", notes.strip()]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("pretraining", "supervised"), default="pretraining",
                        help="pretraining (default): scratch vs each objective; supervised: the shipped CPU recipe "
                        "from scratch over several seeds against the yardsticks, unseen-font and same-font")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fine-tuning seeds (default: the budget's; supervised table 0 1 2)")
    parser.add_argument("--train-soundfonts", nargs="+", default=[str(f) for f in DEMO_TRAIN_FONTS],
                        help="supervised table: training fonts (default: the demo's three)")
    parser.add_argument("--out", default=None, help="working folder (default bench/out/quality or "
                        "bench/out/quality-supervised)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="tiny: minutes, checks the pipeline; full (default): the benchmark")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the labelled data and pretraining; the test data uses +1, the pool +2")
    parser.add_argument("--objectives", type=lambda text: [o for o in text.split(",") if o],
                        default=[*OBJECTIVES, SYNTH_LABELS],
                        help=f"comma-separated (default {','.join((*OBJECTIVES, SYNTH_LABELS))}; {SYNTH_LABELS} is "
                        "a supervised backbone on labelled clips rendered in the pool's fonts, shown apart)")
    parser.add_argument("--unlabeled", type=int, help="override the preset's pool size (clips)")
    parser.add_argument("--pretrain-steps", type=int, help="override the preset's pretraining steps")
    parser.add_argument("--finetune-steps", type=int, help="override the preset's fine-tuning steps")
    parser.add_argument("--probe-steps", type=int, help="override the preset's linear-probe steps")
    parser.add_argument("--pretrain-data", choices=("both", "unlabeled"), default="both",
                        help="pretrain on the unlabeled pool plus the labelled training split (default, as the "
                        "recipes do; the metric objective uses its labels) or on the pool only")
    parser.add_argument("--pool-soundfonts", nargs="+", default=[str(f) for f in DEMO_TRAIN_FONTS],
                        help="the unlabeled pool's fonts, one drawn per clip (default: the demo's three training fonts)")
    parser.add_argument("--finetune-recipe", default=str(RECIPES / "finetune" / "cpu-synth.yaml"),
                        help="every fine-tune's recipe (default recipes/finetune/cpu-synth.yaml)")
    parser.add_argument("--probe-recipe", default=str(RECIPES / "finetune" / "probe.yaml"))
    parser.add_argument("--train-soundfont", default=str(FLUIDR3), help=f"the labelled set's font (default {FLUIDR3})")
    parser.add_argument("--test-soundfont", default=str(bundled_soundfont()),
                        help="default TimGM6mb.sf2 from pretty_midi's package")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every step (default: leave the environment alone)")
    parser.add_argument("--notes", help="markdown file with what was tried, copied into RESULTS.md")
    parser.add_argument("--write-results", action="store_true",
                        help="also write bench/RESULTS.md and its plot (default: only under --out)")
    args = parser.parse_args()
    supervised = args.table == "supervised"
    args.out = args.out or f"bench/out/quality{'-supervised' if supervised else ''}"
    for option in ("finetune_recipe", "probe_recipe", "train_soundfont", "test_soundfont", "notes"):
        value = getattr(args, option)
        if value is not None and not Path(value).is_file():
            raise UserError(f"{value}: not found; pass an existing file as --{option.replace('_', '-')}")
    fonts, option = (args.train_soundfonts, "--train-soundfonts") if supervised else (args.pool_soundfonts,
                                                                                      "--pool-soundfonts")
    for font in fonts:
        if not Path(font).is_file():
            raise UserError(f"{font}: not found; install the demo's fonts (make system-deps) or pass {option}")
    if supervised:
        args.seeds = args.seeds or [0, 1, 2]
    result = run_supervised(args) if supervised else run_bench(args)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    run_cli(main)
