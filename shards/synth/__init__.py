"""`python -m shards synth OUT`: render a synthetic IRMAS-like data set with FluidSynth.

Real IRMAS cannot ship with the toolkit, so the demo and the tests render a stand-in with
the same layout and the same awkward names, read by the same parsers:

- `IRMAS-TrainingData/<code>/[code][dru|nod][genre]NNNN__K.wav`: 3 s, 44.1 kHz stereo, one
  predominant instrument playing a melody 7-13 dB above an accompaniment of other
  instruments, bass and (genre-dependent) drums; several excerpts `__K` per song.
- `IRMAS-TestingData-Part1/Part1/<song>-<N>.wav` + `.txt`: 5-20 s mixtures of 1-4 labelled
  instruments at comparable levels (plus unlabelled bass and drums), one code per line.
- `unlabeled/track-NNNNN.wav`: 3-12 s of music of random instruments and genres. With `--pair-fonts` each track is
  rendered twice, with two different SoundFonts drawn per track, and holds the two renderings as its two channels
  (each a mono mix): the same notes in two timbres, for pretraining views that differ by font
  (`shards pack --channels 2`, then `data.view_source: channels`).

The package by job: `music` (patches, genre styles, songs and parts), `plans` (which clips, their stems and levels),
`render` (MIDI -> FluidSynth -> mixed wav) and, here, the command that renders a whole set.

Each clip is composed as General MIDI (a song has a genre, key, scale, tempo, metre,
chord progression, groove and instrumentation; its excerpts share them), split into stems
(lead / accompaniment for training clips, one stem per labelled instrument for test files)
so the levels are set by measurement rather than hoped for from MIDI volumes, and each
recording gets its own EQ colour (shelves and a mid bell) so no class is one fixed spectrum. Many clips'
stems are laid one after another in one MIDI file and rendered by one FluidSynth process
(loading a SoundFont costs more than rendering a clip), then cut apart, mixed and written as
16-bit wav. Everything is drawn from the seed and batches are fixed by the clip list, so the
same options give byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from core.errors import UserError, non_negative_int, output_folder, positive_int
from core.progress import progress_bar
from shards.sources import TRAIN_DIR
from shards.synth.plans import TEST_DIR, UNLABELED_DIR, Clip, seeded_rng, test_clips, train_clips, unlabeled_clips
from shards.synth.render import (FLUIDR3, SAMPLE_RATE, aligned, batches, check_tools, default_soundfont,
                                 render_batch)

SUMMARY = "synth.json"
FORMAT = "timbre-synth"
VERSION = 1


def drawn_fonts(clip: Clip, fonts: Sequence[Path], seed: int, count: int = 1) -> list[Path]:
    """`count` different fonts for `clip`, drawn in turn from those left by an rng seeded with its path."""
    rng, left = seeded_rng(seed, "soundfont", clip.path), list(fonts)
    return [left.pop(rng.randrange(len(left))) for _ in range(count)]


def font_plan(clips: Sequence[Clip], fonts: Sequence[Path], seed: int) -> list[tuple[Path, list[Clip]]]:
    """Each clip draws one of `fonts`; batches of clips that share a font, in a fixed order."""
    chosen: dict[Path, list[Clip]] = {font: [] for font in fonts}
    for clip in clips:
        chosen[drawn_fonts(clip, fonts, seed)[0]].append(clip)
    return [(font, group) for font in fonts for group in batches(chosen[font])]


def second_renderings(clips: Sequence[Clip], fonts: Sequence[Path], seed: int) -> dict[str, tuple[Clip, Path]]:
    """For font-paired clips: clip path -> (the clip under a hidden temporary name, its second drawn font; the first
    is the one `font_plan` renders it with)."""
    pairs = {}
    for clip in clips:
        path = Path(clip.path)
        pairs[clip.path] = (replace(clip, path=str(path.with_name(f".{path.stem}.second{path.suffix}"))),
                            drawn_fonts(clip, fonts, seed, count=2)[1])
    return pairs


def join_pair(out: Path, path: str, second: str) -> None:
    """Write OUT/path as two channels, the mono mixes of its two renderings (OUT/path, OUT/second), atomically."""
    first_audio, rate = sf.read(out / path, dtype="float32", always_2d=True)
    second_audio, _ = sf.read(out / second, dtype="float32", always_2d=True)
    joined = np.stack([first_audio.mean(axis=1), second_audio.mean(axis=1)], axis=1)
    temp = (out / path).with_name(Path(path).name + ".tmp")
    sf.write(temp, joined, rate, subtype="PCM_16", format="WAV")
    os.replace(temp, out / path)
    (out / second).unlink()


def _prepare(out: Path, options: dict) -> bool:
    """True when OUT already holds exactly this data set; otherwise clear an earlier synth tree there."""
    summary = out / SUMMARY
    ours = (TRAIN_DIR, TEST_DIR, UNLABELED_DIR)
    if summary.exists():
        try:
            previous = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("format") != FORMAT:
            raise UserError(f"{summary}: exists but was not written by shards synth; choose an empty OUT folder")
        if previous.get("complete") and previous.get("options") == options and all(
                (out / item["path"]).is_file() for split in previous["clips"].values() for item in split):
            return True
        for name in ours:
            shutil.rmtree(out / name, ignore_errors=True)
    else:
        for name in ours:
            if (out / name).exists():
                raise UserError(f"{out / name}: exists and was not written by shards synth; "
                                "choose an empty OUT folder or remove it")
    output_folder(out)
    summary.write_text(json.dumps({"format": FORMAT, "version": VERSION, "complete": False, "options": options}))
    return False


def _counts(items: Sequence[dict], key: str) -> dict[str, int]:
    counter: Counter = Counter()
    for item in items:
        value = item.get(key)
        for v in value if isinstance(value, list) else [value]:
            counter[str(v)] += 1
    return dict(sorted(counter.items()))


def synthesize(out: str | os.PathLike, *, train_per_class: int = 24, test_files: int = 24, unlabeled: int = 240,
               seed: int = 0, soundfonts: Sequence[str | os.PathLike] = (), pair_fonts: bool = False,
               workers: int | None = None, sample_rate: int = SAMPLE_RATE, progress: bool = True) -> dict:
    """Render the data set under `out` and return (and write) its synth.json summary.

    Every clip is rendered with one of `soundfonts` (drawn per clip; default: `default_soundfont()`), so a set
    rendered with several General MIDI fonts shows each instrument in several timbres. With `pair_fonts`, each
    unlabeled clip is rendered with two of them and written as a two-channel file, one rendering per channel.

    Audio is written at `sample_rate` (IRMAS's 44.1 kHz by default). FluidSynth does not band-limit what it plays, so
    a low rate folds the top of the spectrum back down: at 16 kHz rendering is about twice as fast, but 6-7.5 kHz
    come out ~2 dB louder than from a 44.1 kHz render resampled by pack, which log-mel statistics notice.

    Rerunning with the same options finds the complete tree and does nothing; other options
    replace the tree an earlier run wrote there.
    """
    for name, value in (("--train-per-class", train_per_class), ("--test-files", test_files),
                        ("--unlabeled", unlabeled)):
        if value < 0:
            raise UserError(f"{name}: {value} is negative; pass a count >= 0")
    if not aligned(sample_rate):
        raise UserError(f"--sample-rate: {sample_rate} Hz is not a multiple of 100 Hz (stems would not align with "
                        "FluidSynth's 64-sample blocks); pass 16000, 32000, 44100 or 48000, for example")
    out = Path(out)
    fonts = [Path(font) for font in soundfonts] or [default_soundfont()]
    for font in fonts:
        check_tools(font)
    if len({font.resolve() for font in fonts}) < len(fonts):
        raise UserError(f"--soundfont: {' '.join(map(str, fonts))} names a SoundFont twice; pass each once")
    if pair_fonts and len(fonts) < 2:
        raise UserError("--pair-fonts: renders each unlabeled clip with two SoundFonts; pass at least two with "
                        "--soundfont")
    options = {"train_per_class": train_per_class, "test_files": test_files, "unlabeled": unlabeled, "seed": seed,
               "soundfonts": [str(font.resolve()) for font in fonts], "sample_rate": sample_rate}
    if pair_fonts:
        options["pair_fonts"] = True
    if _prepare(out, options):
        return json.loads((out / SUMMARY).read_text())
    plans = {"train": train_clips(seed, train_per_class), "test": test_clips(seed, test_files),
             "unlabeled": unlabeled_clips(seed, unlabeled)}
    clips = [clip for split in plans.values() for clip in split]
    groups = font_plan(clips, fonts, seed)
    pairs = second_renderings(plans["unlabeled"], fonts, seed) if pair_fonts else {}
    for font in fonts:
        groups += [(font, group) for group in batches([clip for clip, second in pairs.values() if second == font])]
    workers = max(1, min(workers or os.cpu_count() or 1, len(groups) or 1))
    started = time.perf_counter()
    summaries: list[dict] = []
    bar = progress_bar(total=sum(len(group) for _, group in groups), desc="synth", unit="clip", enabled=progress)
    if workers == 1:
        for font, group in groups:
            summaries += render_batch(group, font, out, sample_rate)
            bar.update(len(group))
    else:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = [pool.apply_async(render_batch, (group, font, out, sample_rate)) for font, group in groups]
            for (_, group), result in zip(groups, results):
                summaries += result.get()
                bar.update(len(group))
    bar.close()
    by_path = {item["path"]: item for item in summaries}
    for path, (second, _) in pairs.items():
        join_pair(out, path, second.path)
        by_path[path]["soundfont"] = [by_path[path]["soundfont"], by_path.pop(second.path)["soundfont"]]
    elapsed = time.perf_counter() - started
    listed = {split: [by_path[clip.path] for clip in split_clips] for split, split_clips in plans.items()}
    summary = {
        "format": FORMAT, "version": VERSION, "complete": True, "options": options,
        "fluidsynth": _fluidsynth_version(),
        "counts": {split: len(items) for split, items in listed.items()},
        "seconds": {split: round(sum(i["seconds"] for i in items), 2) for split, items in listed.items()},
        "train_instruments": _counts(listed["train"], "instrument"),
        "train_genres": _counts(listed["train"], "genre"),
        "train_drums": _counts(listed["train"], "drums"),
        "test_instruments": _counts(listed["test"], "instruments"),
        "test_genres": _counts(listed["test"], "genre"),
        "soundfonts": _counts(list(by_path.values()), "soundfont"),
        "clips": {split: [{"path": i["path"], "seconds": i["seconds"], "soundfont": i["soundfont"]} for i in items]
                  for split, items in listed.items()},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    summary["render_seconds"] = elapsed
    return summary


def _fluidsynth_version() -> str:
    result = subprocess.run(["fluidsynth", "--version"], capture_output=True, text=True)
    return next((line.strip() for line in result.stdout.splitlines() if "version" in line.lower()), "unknown")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="render a synthetic IRMAS-like data set with FluidSynth",
        description="Render an IRMAS-layout tree under OUT: IRMAS-TrainingData (3 s clips, one predominant "
        "instrument per class folder), IRMAS-TestingData-Part1 (5-20 s mixtures with .txt labels) and unlabeled/ "
        "(music for pretraining), from General MIDI with FluidSynth. The same seed gives the same files.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--train-per-class", type=non_negative_int, default=24, help="training clips per instrument (default 24)")
    parser.add_argument("--test-files", type=non_negative_int, default=24, help="labelled test excerpts (default 24)")
    parser.add_argument("--unlabeled", type=non_negative_int, default=240, help="unlabeled clips for pretraining (default 240)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--soundfont", nargs="+", default=[], metavar="SF2",
                        help="General MIDI .sf2/.sf3 files; each clip is rendered with one of them, drawn per clip "
                        f"(default {FLUIDR3} if present, else pretty_midi's TimGM6mb.sf2)")
    parser.add_argument("--pair-fonts", action="store_true",
                        help="render each unlabeled clip with two different SoundFonts (drawn per clip) and write the "
                        "two renderings as the file's two channels: views that differ by font for pretraining "
                        "(pack with --channels 2, pretrain with data.view_source=channels)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="FluidSynth processes in parallel (default: all cores)")
    parser.add_argument("--sample-rate", type=positive_int, default=SAMPLE_RATE,
                        help=f"audio rate in Hz, a multiple of 100 (default {SAMPLE_RATE}, IRMAS's; 16000 renders about twice "
                        "as fast, with FluidSynth's aliasing in the top 2 kHz)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = synthesize(args.out, train_per_class=args.train_per_class, test_files=args.test_files,
                         unlabeled=args.unlabeled, seed=args.seed, soundfonts=args.soundfont, pair_fonts=args.pair_fonts,
                         workers=args.workers, sample_rate=args.sample_rate, progress=not args.quiet)
    counts, seconds = summary["counts"], summary["seconds"]
    took = f" in {summary['render_seconds']:.1f} s" if "render_seconds" in summary else " (already rendered)"
    print(f"{args.out}: {counts['train']} training clips, {counts['test']} test files, {counts['unlabeled']} unlabeled "
          f"clips ({sum(seconds.values()):.0f} s of audio){took}; soundfonts "
          f"{', '.join(Path(font).name for font in summary['options']['soundfonts'])}")
    return 0
