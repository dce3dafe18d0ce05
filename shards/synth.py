"""`python -m shards synth OUT`: render a synthetic IRMAS-like data set with FluidSynth.

Real IRMAS cannot ship with the toolkit, so the demo and the tests render a stand-in with
the same layout and the same awkward names, read by the same parsers:

- `IRMAS-TrainingData/<code>/[code][dru|nod][genre]NNNN__K.wav`: 3 s, 44.1 kHz stereo, one
  predominant instrument playing a melody 7-13 dB above an accompaniment of other
  instruments, bass and (genre-dependent) drums; several excerpts `__K` per song.
- `IRMAS-TestingData-Part1/Part1/<song>-<N>.wav` + `.txt`: 5-20 s mixtures of 1-4 labelled
  instruments at comparable levels (plus unlabelled bass and drums), one code per line.
- `unlabeled/track-NNNNN.wav`: 3-12 s of music of random instruments and genres.

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
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mido
import numpy as np
import soundfile as sf

from core.errors import UserError, non_negative_int, output_folder, positive_int
from core.progress import progress_bar
from shards.sources import TRAIN_DIR
from shards.vocab import DRUMS, GENRE_NAMES, GENRES, INSTRUMENT_NAMES, INSTRUMENTS

SAMPLE_RATE = 44100
TRAIN_SECONDS = 3.0
TEST_SECONDS = (5.0, 20.0)
UNLABELED_SECONDS = (3.0, 12.0)
TEST_DIR = "IRMAS-TestingData-Part1"
TEST_INNER_DIR = "Part1"
UNLABELED_DIR = "unlabeled"
SUMMARY = "synth.json"
FORMAT = "timbre-synth"
VERSION = 1
FLUIDR3 = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = "install FluidSynth and a General MIDI SoundFont (apt-get install fluidsynth fluid-soundfont-gm, " \
               "or brew install fluid-synth)"
WITH_DRUMS, NO_DRUMS = DRUMS
BATCH_SECONDS = 120.0  # stem audio rendered by one FluidSynth process
GAP_SECONDS = 0.25  # silence between two stems in a batch (voices are killed at each stem's end)
TICKS_PER_SECOND = 1000  # MIDI clock of the batch files: 1 tick = 1 ms (tempo 60 bpm, 1000 ticks per beat)
# FluidSynth plays MIDI events at the first 64-sample block after their time, so stems start on multiples of
# 640 ms (= 441 blocks at 44.1 kHz): every stem then sounds the same, sample for sample, wherever it is rendered.
ALIGN_TICKS = 640
DRUM_CHANNEL = 9


# --- Instruments -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Patch:
    """A General MIDI program and the pitch range it is played in."""

    program: int
    low: int
    high: int


@dataclass(frozen=True, kw_only=True)
class Timbre:
    """How one IRMAS class is played: GM patches, whether it sustains and chords, genres it is common in."""

    patches: tuple[Patch, ...]
    sustained: bool  # bowed, blown, sung or organ: long notes hold; otherwise plucked/struck and decaying
    chords: bool  # can comp chords
    genres: dict[str, int] = field(default_factory=dict)  # genre name -> extra weight


def _patches(programs: Sequence[int], low: int, high: int) -> tuple[Patch, ...]:
    return tuple(Patch(program=p, low=low, high=high) for p in programs)


# Keyed by vocab.INSTRUMENT_NAMES values; validated against vocab.INSTRUMENTS below.
TIMBRES_BY_NAME: dict[str, Timbre] = {
    "cello": Timbre(patches=_patches([42], 36, 72), sustained=True, chords=False, genres={"classical": 4}),
    "clarinet": Timbre(patches=_patches([71], 50, 86), sustained=True, chords=False,
                       genres={"classical": 3, "jazz-blues": 2}),
    "flute": Timbre(patches=_patches([73], 60, 93), sustained=True, chords=False,
                    genres={"classical": 3, "latin-soul": 2, "jazz-blues": 1}),
    "acoustic guitar": Timbre(patches=_patches([24, 25], 40, 79), sustained=False, chords=True,
                              genres={"country-folk": 3, "pop-rock": 2, "latin-soul": 2}),
    "electric guitar": Timbre(patches=_patches([26, 27, 28, 29, 30], 40, 84), sustained=False, chords=True,
                              genres={"pop-rock": 4, "jazz-blues": 2, "country-folk": 1}),
    "organ": Timbre(patches=_patches([16, 17, 18, 19, 20], 43, 84), sustained=True, chords=True,
                    genres={"pop-rock": 2, "jazz-blues": 2, "classical": 2, "latin-soul": 1}),
    "piano": Timbre(patches=_patches([0, 1, 2], 43, 91), sustained=False, chords=True,
                    genres={"classical": 2, "jazz-blues": 2, "pop-rock": 2}),
    "saxophone": Timbre(patches=(Patch(program=64, low=56, high=87), Patch(program=65, low=49, high=80),
                                 Patch(program=66, low=44, high=75), Patch(program=67, low=36, high=69)),
                        sustained=True, chords=False, genres={"jazz-blues": 4, "latin-soul": 2, "pop-rock": 1}),
    "trumpet": Timbre(patches=_patches([56], 55, 82), sustained=True, chords=False,
                      genres={"jazz-blues": 3, "latin-soul": 3, "classical": 1}),
    "violin": Timbre(patches=_patches([40], 55, 96), sustained=True, chords=False,
                     genres={"classical": 4, "country-folk": 2}),
    "voice": Timbre(patches=_patches([52, 53, 54], 48, 79), sustained=True, chords=False,
                    genres={"pop-rock": 3, "jazz-blues": 2, "latin-soul": 2, "country-folk": 2}),
}


def _by_code(table: dict[str, object], names: dict[str, str], codes: Sequence[str], what: str) -> dict[str, object]:
    """Re-key a table written with readable names by the vocabulary's codes; every code exactly once."""
    wanted = {names[code] for code in codes}
    if set(table) != wanted:
        raise RuntimeError(f"synth {what} table does not match shards.vocab: missing {sorted(wanted - set(table))}, "
                           f"unknown {sorted(set(table) - wanted)}")
    return {code: table[names[code]] for code in codes}


TIMBRES: dict[str, Timbre] = _by_code(TIMBRES_BY_NAME, INSTRUMENT_NAMES, INSTRUMENTS, "instrument")

# --- Genres ------------------------------------------------------------------------------

SCALES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {  # name -> (harmony: 7 degrees, melody notes)
    "major": ((0, 2, 4, 5, 7, 9, 11), (0, 2, 4, 5, 7, 9, 11)),
    "minor": ((0, 2, 3, 5, 7, 8, 10), (0, 2, 3, 5, 7, 8, 10)),
    "harmonic minor": ((0, 2, 3, 5, 7, 8, 11), (0, 2, 3, 5, 7, 8, 11)),
    "dorian": ((0, 2, 3, 5, 7, 9, 10), (0, 2, 3, 5, 7, 9, 10)),
    "mixolydian": ((0, 2, 4, 5, 7, 9, 10), (0, 2, 4, 5, 7, 9, 10)),
    "major pentatonic": ((0, 2, 4, 5, 7, 9, 11), (0, 2, 4, 7, 9)),
    "minor pentatonic": ((0, 2, 3, 5, 7, 8, 10), (0, 3, 5, 7, 10)),
    "blues": ((0, 2, 4, 5, 7, 9, 10), (0, 3, 5, 6, 7, 10)),
}

# 16 steps per 4/4 bar (12 per 3/4 bar): x accent, o soft, . rest. Keys are GM percussion notes.
KICK, SIDE_STICK, SNARE, CLOSED_HAT, PEDAL_HAT, OPEN_HAT, CRASH, RIDE = 36, 37, 38, 42, 44, 46, 49, 51
COWBELL, HI_BONGO, LOW_BONGO, MUTE_CONGA, OPEN_CONGA, LOW_CONGA, MARACAS, CLAVES = 56, 60, 61, 62, 63, 64, 70, 75
GROOVES: dict[str, dict[int, str]] = {
    "rock": {KICK: "x.......x.x.....", SNARE: "....x.......x...", CLOSED_HAT: "x.x.x.x.x.x.x.x."},
    "pop": {KICK: "x...x...x...x...", SNARE: "....x.......x...", OPEN_HAT: "..o...o...o...o.",
            CLOSED_HAT: "o...o...o...o..."},
    "funk": {KICK: "x..x..x...x.....", SNARE: "....x..o.o..x...", CLOSED_HAT: "xoxoxoxoxoxoxoxo"},
    "country": {KICK: "x.......x.......", SNARE: "..o.x.o...o.x.o.", CLOSED_HAT: "x.x.x.x.x.x.x.x."},
    "swing": {RIDE: "x...x.o.x...x.o.", PEDAL_HAT: "....x.......x...", KICK: "o...o...o...o..."},
    "shuffle": {RIDE: "x.o.x.o.x.o.x.o.", SNARE: "....x.......x...", KICK: "x.......x......."},
    "bossa": {KICK: "x..xx..xx..xx..x", SIDE_STICK: "x..x..x...x..x..", MARACAS: "oooooooooooooooo"},
    "salsa": {CLAVES: "x..x..x...x.x...", COWBELL: "x.o.x.o.x.o.x.o.", OPEN_CONGA: "......x.......x.",
              MUTE_CONGA: "..o.......o.....", LOW_CONGA: "...........x...."},
    "bongo": {HI_BONGO: "x.o.x.o.x.o.xoo.", LOW_BONGO: "...x.......x....", MARACAS: "x.o.x.o.x.o.x.o."},
    "waltz": {KICK: "x...........", SNARE: "....o...o...", CLOSED_HAT: "x...x...x..."},
}


@dataclass(frozen=True, kw_only=True)
class Style:
    """What a genre sounds like here: tempo, metre, feel, harmony, groove and backing instruments."""

    tempo: tuple[int, int]
    meters: tuple[int, ...]  # beats per bar
    swing: tuple[float, float]  # where the off-beat eighth falls (0.5 straight, 0.67 triplet swing)
    scales: tuple[str, ...]
    progressions: tuple[tuple[int, ...], ...]  # chord roots as 0-based degrees of the harmony scale, one per bar
    sevenths: float  # probability of seventh chords
    drums: float  # probability that a song has drums
    kits: tuple[int, ...]  # GM drum kits (bank 128 programs)
    grooves: tuple[str, ...]
    comp: str  # comping rhythm of plucked/struck chord instruments: a GROOVES-like step string
    bass: str  # bass line: root, root-fifth, eighths, walking, tumbao
    basses: tuple[int, ...]  # GM bass programs (no IRMAS class)
    backing: tuple[str, ...]  # instrument names that accompany here


STYLES_BY_NAME: dict[str, Style] = {
    "country-folk": Style(tempo=(88, 140), meters=(4, 4, 3), swing=(0.5, 0.55), scales=("major", "mixolydian",
                          "major pentatonic"), progressions=((0, 3, 4, 0), (0, 4, 5, 3), (0, 0, 3, 4), (0, 3, 0, 4)),
                          sevenths=0.1, drums=0.6, kits=(0, 8, 40), grooves=("country", "rock"),
                          comp="x.o.x.o.x.o.x.o.", bass="root-fifth", basses=(32, 33),
                          backing=("acoustic guitar", "piano", "violin", "electric guitar")),
    "classical": Style(tempo=(60, 126), meters=(4, 3, 3, 2), swing=(0.5, 0.5), scales=("major", "harmonic minor",
                       "minor"), progressions=((0, 3, 4, 0), (0, 5, 1, 4), (0, 4, 5, 3), (0, 1, 4, 0), (5, 1, 4, 0)),
                       sevenths=0.15, drums=0.0, kits=(48,), grooves=(), comp="xoooxoooxoooxooo", bass="root",
                       basses=(43, 45, 32), backing=("piano", "organ", "violin", "cello", "flute", "clarinet")),
    "pop-rock": Style(tempo=(90, 150), meters=(4,), swing=(0.5, 0.52), scales=("major", "minor", "mixolydian",
                      "minor pentatonic"), progressions=((0, 4, 5, 3), (5, 3, 0, 4), (0, 6, 3, 0), (0, 3, 5, 4)),
                      sevenths=0.05, drums=0.9, kits=(0, 8, 16, 24), grooves=("rock", "pop", "funk"),
                      comp="x.x.x.x.x.x.x.x.", bass="eighths", basses=(33, 34, 35, 38),
                      backing=("electric guitar", "piano", "organ", "acoustic guitar")),
    "latin-soul": Style(tempo=(88, 130), meters=(4,), swing=(0.5, 0.56), scales=("dorian", "minor", "major"),
                        progressions=((1, 4, 0, 0), (0, 3, 0, 4), (0, 5, 1, 4), (1, 4, 1, 4)), sevenths=0.6,
                        drums=0.85, kits=(0, 8, 24), grooves=("bossa", "salsa", "bongo", "funk"),
                        comp="x..x..x...x.x...", bass="tumbao", basses=(32, 33, 35),
                        backing=("piano", "acoustic guitar", "organ", "electric guitar")),
    "jazz-blues": Style(tempo=(70, 190), meters=(4,), swing=(0.6, 0.67), scales=("blues", "dorian", "mixolydian",
                        "major"), progressions=((0, 0, 0, 0, 3, 3, 0, 0, 4, 3, 0, 4), (1, 4, 0, 0), (0, 5, 1, 4),
                        (2, 5, 1, 4)), sevenths=0.9, drums=0.85, kits=(32, 40, 0), grooves=("swing", "shuffle"),
                        comp="x.....x...x.....", bass="walking", basses=(32, 33),
                        backing=("piano", "electric guitar", "organ")),
}
STYLES: dict[str, Style] = _by_code(STYLES_BY_NAME, GENRE_NAMES, GENRES, "genre")

# --- Songs and notes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    start: float  # seconds from the clip start
    end: float
    pitch: int
    velocity: int


@dataclass(kw_only=True)
class Part:
    """One MIDI channel's worth of a clip: a program (or drum kit) and its notes."""

    program: int
    drums: bool = False
    notes: list[Note] = field(default_factory=list)
    volume: int = 100  # CC7
    pan: int = 64  # CC10


@dataclass(frozen=True, kw_only=True)
class Colour:
    """A recording's tone: low shelf, high shelf and a broad mid bell, in dB (zero-phase EQ)."""

    low_db: float = 0.0
    low_hz: float = 150.0
    high_db: float = 0.0
    high_hz: float = 5000.0
    mid_db: float = 0.0
    mid_hz: float = 1000.0

    def gain(self, frequencies: np.ndarray) -> np.ndarray:
        """Linear amplitude gain at `frequencies` (Hz)."""
        f = np.maximum(frequencies, 1.0)
        low = self.low_db / (1 + (f / self.low_hz) ** 2)
        high = self.high_db * (f / self.high_hz) ** 2 / (1 + (f / self.high_hz) ** 2)
        mid = self.mid_db * np.exp(-0.5 * np.log2(f / self.mid_hz) ** 2)
        return 10 ** ((low + high + mid) / 20)


def new_colour(rng: random.Random) -> Colour:
    """Different microphones, rooms and mixes: the same instrument never has quite the same spectrum."""
    return Colour(low_db=rng.uniform(-5, 5), low_hz=rng.uniform(80, 300), high_db=rng.uniform(-8, 5),
                  high_hz=rng.uniform(2500, 8000), mid_db=rng.uniform(-4, 4), mid_hz=rng.uniform(300, 3000))


def colour(audio: np.ndarray, tone: Colour) -> np.ndarray:
    """`audio` (frames, channels) through the EQ `tone`, by FFT (float64), zero-padded to a fast length."""
    n = _fast_length(len(audio) + SAMPLE_RATE // 10)
    spectrum = np.fft.rfft(audio.astype(np.float64), n=n, axis=0)
    spectrum *= tone.gain(np.fft.rfftfreq(n, 1 / SAMPLE_RATE))[:, None]
    return np.fft.irfft(spectrum, n=n, axis=0)[: len(audio)]


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT lengths with large prime factors are many times slower)."""
    best, power5 = 2 * n, 1
    while power5 < best:
        power3 = power5
        while power3 < best:
            size = power3 * 2 ** max(0, math.ceil(math.log2(n / power3)))
            best = min(best, size)
            power3 *= 3
        power5 *= 5
    return best


@dataclass(kw_only=True)
class Clip:
    """One output file: its stems (rendered separately) and how loud each is in the mix."""

    path: str  # relative to OUT
    seconds: float
    stems: list[list[Part]]
    levels: list[float]  # dB of each stem's RMS relative to the others
    loudness: float  # RMS of the mix in dBFS
    labels: tuple[str, ...] = ()  # written to <name>.txt (test files)
    label_suffix: str = ""  # trailing characters of each label line, as real IRMAS has
    tone: Colour = field(default_factory=Colour)  # the recording's EQ, applied to every stem
    info: dict = field(default_factory=dict)  # genre, drums, instruments, tempo ... for synth.json


@dataclass(kw_only=True)
class Song:
    """What a song's excerpts share: genre, harmony, tempo, feel and drums."""

    genre: str
    style: Style
    tonic: int  # pitch class
    scale: str
    tempo: float
    meter: int
    swing: float
    progression: tuple[int, ...]
    sevenths: bool
    kit: int | None  # None: no drums
    groove: str | None

    @property
    def beat(self) -> float:
        return 60.0 / self.tempo

    def bars(self, seconds: float) -> int:
        return math.ceil(seconds / (self.beat * self.meter)) + 1

    def chord(self, bar: int) -> list[int]:
        """Pitch classes of the chord of `bar` (root first)."""
        harmony = SCALES[self.scale][0]
        degree = self.progression[bar % len(self.progression)]
        size = 4 if self.sevenths else 3
        return [(self.tonic + harmony[(degree + 2 * k) % 7]) % 12 for k in range(size)]

    def time(self, bar: int, step: float, steps_per_beat: int = 4) -> float:
        """Seconds of a step (sixteenth by default) in `bar`, with the off-beat eighths swung."""
        beats = step / steps_per_beat
        whole, frac = divmod(beats, 1.0)
        if steps_per_beat == 4 and abs(frac - 0.5) < 1e-9:
            frac = self.swing
        return (bar * self.meter + whole + frac) * self.beat


def new_song(rng: random.Random, genre: str) -> Song:
    style = STYLES[genre]
    meter = rng.choice(style.meters)
    has_drums = rng.random() < style.drums
    grooves = ("waltz",) if meter == 3 else style.grooves
    return Song(
        genre=genre, style=style, tonic=rng.randrange(12), scale=rng.choice(style.scales),
        tempo=float(rng.randint(*style.tempo)), meter=meter, swing=rng.uniform(*style.swing),
        progression=rng.choice(style.progressions), sevenths=rng.random() < style.sevenths,
        kit=rng.choice(style.kits) if has_drums and grooves else None,
        groove=rng.choice(grooves) if has_drums and grooves else None,
    )


def _clip_notes(notes: list[Note], seconds: float) -> list[Note]:
    """Keep the notes that start inside the clip, cut at its end."""
    return [Note(n.start, min(n.end, seconds), n.pitch, n.velocity) for n in notes
            if n.start < seconds - 0.02 and n.end > n.start]


def _velocity(rng: random.Random, base: float, accent: bool = False) -> int:
    return int(min(127, max(1, round(base + (10 if accent else 0) + rng.gauss(0, 6)))))


def _register(rng: random.Random, patch: Patch, width: int) -> tuple[int, int]:
    """A sub-range of the patch's range where this part sits (low, middle or high register)."""
    width = min(width, patch.high - patch.low)
    low = rng.randint(patch.low, patch.high - width)
    return low, low + width


def _nearest(pitch_classes: Sequence[int], target: float, low: int, high: int) -> int:
    candidates = [p for p in range(low, high + 1) if p % 12 in pitch_classes]
    return min(candidates, key=lambda p: (abs(p - target), p)) if candidates else int(round(target))


MELODY_RHYTHMS: dict[str, tuple[float, ...]] = {  # durations in beats
    "slow": (2.0, 1.0, 1.5, 1.0, 3.0, 0.5),
    "medium": (1.0, 0.5, 0.5, 1.0, 1.5, 0.5, 2.0),
    "fast": (0.5, 0.25, 0.25, 0.5, 0.5, 1.0),
}
ARTICULATIONS: dict[str, float] = {"legato": 0.97, "normal": 0.82, "staccato": 0.45}  # sounding fraction


def melody(rng: random.Random, song: Song, patch: Patch, sustained: bool, *, start_bar: int, seconds: float,
           velocity: float, density: str | None = None, width: int = 17) -> list[Note]:
    """A phrased melodic line on the song's scale, chord tones on strong beats, in a register of the patch."""
    density = density or rng.choice(tuple(MELODY_RHYTHMS))
    articulation = rng.choice(("legato", "normal", "normal") if sustained else ("normal", "normal", "staccato"))
    low, high = _register(rng, patch, width)
    scale = [(song.tonic + s) % 12 for s in SCALES[song.scale][1]]
    pitches = [p for p in range(low, high + 1) if p % 12 in scale]
    index = rng.randrange(len(pitches))
    notes, beat, total = [], 0.0, song.bars(seconds) * song.meter
    phrase_end = rng.choice((4, 8)) * 1.0
    while beat < total:
        length = rng.choice(MELODY_RHYTHMS[density])
        if beat + 1e-9 >= phrase_end:  # breathe between phrases
            beat += rng.choice((0.5, 1.0, 1.0, 2.0))
            phrase_end = beat + rng.choice((4, 6, 8))
            continue
        bar, in_bar = divmod(beat, song.meter)
        strong = abs(in_bar - round(in_bar)) < 1e-9 and int(round(in_bar)) % 2 == 0
        index = min(len(pitches) - 1, max(0, index + rng.choice((-2, -1, -1, 0, 1, 1, 2, -3, 3, -4, 4))))
        pitch = pitches[index]
        if strong:
            pitch = _nearest(song.chord(start_bar + int(bar)), pitch, low, high)
            index = min(range(len(pitches)), key=lambda i: abs(pitches[i] - pitch))
        start = song.time(start_bar + int(bar), in_bar * 4) - start_bar * song.meter * song.beat
        end = start + length * song.beat * ARTICULATIONS[articulation]
        notes.append(Note(start, end, pitch, _velocity(rng, velocity, strong)))
        if not sustained and strong and rng.random() < 0.25:  # a double stop on plucked and keyboard leads
            below = _nearest(song.chord(start_bar + int(bar)), pitch - 4, low - 7, pitch - 3)
            notes.append(Note(start, end, below, _velocity(rng, velocity - 10)))
        beat += length
    return _clip_notes(notes, seconds)


def chords(rng: random.Random, song: Song, patch: Patch, sustained: bool, *, start_bar: int, seconds: float,
           velocity: float) -> list[Note]:
    """Chords: held pads for sustained instruments, the genre's comping rhythm (or arpeggios) for the others."""
    low, high = _register(rng, patch, 19)
    centre = (low + high) / 2
    arpeggio = not sustained and rng.random() < (0.6 if song.genre == GENRES[1] else 0.2)
    notes = []
    for bar in range(song.bars(seconds)):
        pcs = song.chord(start_bar + bar)
        voicing = sorted({_nearest([pc], centre - 3 + 2.5 * k, low, high) for k, pc in enumerate(pcs)})
        bar_start = bar * song.meter * song.beat
        if sustained:
            hold = rng.choice((song.meter, song.meter / 2 if song.meter % 2 == 0 else song.meter))
            for offset in np.arange(0, song.meter, hold):
                start = bar_start + float(offset) * song.beat
                for pitch in voicing:
                    notes.append(Note(start, start + hold * song.beat * 0.98, pitch, _velocity(rng, velocity)))
        elif arpeggio:
            steps = song.meter * 2
            for k in range(steps):
                start = song.time(start_bar + bar, 2 * k) - start_bar * song.meter * song.beat
                pitch = voicing[k % len(voicing)] if k % 4 != 3 else voicing[-1] + 12
                notes.append(Note(start, start + song.beat, pitch, _velocity(rng, velocity, k == 0)))
        else:
            pattern = song.style.comp[: song.meter * 4]
            for step, hit in enumerate(pattern):
                if hit == ".":
                    continue
                start = song.time(start_bar + bar, step) - start_bar * song.meter * song.beat
                duration = song.beat * (0.45 if hit == "o" else 0.9)
                for k, pitch in enumerate(voicing):
                    strum = 0.012 * k if patch.program in range(24, 32) else 0.0
                    notes.append(Note(start + strum, start + duration, pitch,
                                      _velocity(rng, velocity - (12 if hit == "o" else 0))))
    return _clip_notes(notes, seconds)


def line(rng: random.Random, song: Song, patch: Patch, *, start_bar: int, seconds: float,
         velocity: float) -> list[Note]:
    """A slow chord-tone line (a string or wind section part under the melody)."""
    low, high = _register(rng, patch, 14)
    pitch, notes = (low + high) // 2, []
    for bar in range(song.bars(seconds)):
        pitch = _nearest(song.chord(start_bar + bar), pitch + rng.choice((-2, 0, 2)), low, high)
        start = bar * song.meter * song.beat
        notes.append(Note(start, start + song.meter * song.beat * 0.97, pitch, _velocity(rng, velocity)))
    return _clip_notes(notes, seconds)


def bass(rng: random.Random, song: Song, *, start_bar: int, seconds: float, velocity: float) -> list[Note]:
    """The genre's bass line on chord roots, fifths and passing tones, around E1-E3."""
    kind, notes = song.style.bass, []
    for bar in range(song.bars(seconds)):
        pcs = song.chord(start_bar + bar)
        following = song.chord(start_bar + bar + 1)[0]
        root = _nearest([pcs[0]], 36, 28, 47)
        fifth = _nearest([pcs[2]], root + 7, root, root + 12)
        if kind == "walking":
            approach = _nearest([following], root + 6, 28, 52) + rng.choice((-1, 1))  # chromatic lead-in
            tones = [root] + [_nearest(pcs, root + rng.choice((3, 5, 7, 9, 12)), 28, 52)
                              for _ in range(song.meter - 2)] + [approach]
            hits = [(float(b), tone, 0.9) for b, tone in enumerate(tones)]
        elif kind == "eighths":
            hits = [(b / 2, root if b % 8 < 6 else fifth, 0.45) for b in range(song.meter * 2)]
        elif kind == "root-fifth":
            every = 1 if song.meter == 3 else 2
            hits = [(float(b), root if b % 2 == 0 else fifth, 0.8) for b in range(0, song.meter, every)]
        elif kind == "tumbao":
            hits = [(1.5, fifth, 0.9), (3.0, root, 0.9)] if song.meter == 4 else [(0.0, root, 1.0)]
        else:
            hits = [(0.0, root, song.meter * 0.95)]
        for beat, pitch, length in hits:
            start = song.time(start_bar + bar, beat * 4) - start_bar * song.meter * song.beat
            notes.append(Note(start, start + length * song.beat, pitch, _velocity(rng, velocity, beat == 0.0)))
    return _clip_notes(notes, seconds)


def drums(rng: random.Random, song: Song, *, start_bar: int, seconds: float, velocity: float) -> list[Note]:
    """The song's groove, with a crash on the first downbeat now and then."""
    notes = []
    groove = GROOVES[song.groove]
    for bar in range(song.bars(seconds)):
        for pitch, pattern in groove.items():
            for step, hit in enumerate(pattern[: song.meter * 4]):
                if hit == "." or rng.random() < 0.05:
                    continue
                start = song.time(start_bar + bar, step) - start_bar * song.meter * song.beat
                notes.append(Note(start, start + 0.1, pitch, _velocity(rng, velocity - (30 if hit == "o" else 0))))
    if rng.random() < 0.3:
        notes.append(Note(0.0, 0.5, CRASH, _velocity(rng, velocity)))
    return _clip_notes(notes, seconds)


# --- Clip plans ----------------------------------------------------------------------------


def _rng(seed: int, *names: object) -> random.Random:
    """An independent, reproducible stream per (seed, purpose, index): str seeds hash with SHA-512."""
    return random.Random("/".join(str(n) for n in (seed, *names)))


def _weighted(rng: random.Random, options: Sequence[str], weights: Sequence[float]) -> str:
    return rng.choices(list(options), weights=list(weights), k=1)[0]


def _genre_for(rng: random.Random, code: str) -> str:
    """A genre for a song led by `code`: any genre, more often those the instrument is common in."""
    bonus = TIMBRES[code].genres
    return _weighted(rng, GENRES, [1 + bonus.get(GENRE_NAMES[g], 0) for g in GENRES])


def _part(rng: random.Random, song: Song, code: str, role: str, *, start_bar: int, seconds: float,
          velocity: float, patch: Patch | None = None, density: str | None = None) -> Part:
    """Instrument `code` in a role: melody, chords or (sustained chord-tone) line."""
    timbre = TIMBRES[code]
    patch = patch or rng.choice(timbre.patches)
    kwargs = dict(start_bar=start_bar, seconds=seconds, velocity=velocity)
    if role == "melody":
        notes = melody(rng, song, patch, timbre.sustained, density=density, **kwargs)
    elif role == "chords":
        notes = chords(rng, song, patch, timbre.sustained, **kwargs)
    else:
        notes = line(rng, song, patch, **kwargs)
    return Part(program=patch.program, notes=notes, volume=rng.randint(90, 115), pan=rng.randint(34, 94))


def _backing_role(code: str) -> str:
    return "chords" if TIMBRES[code].chords else "line"


def _rhythm_section(rng: random.Random, song: Song, *, start_bar: int, seconds: float, bass_probability: float
                    ) -> list[Part]:
    """Bass (a GM bass, not an IRMAS class) and drums, as the song has them."""
    parts = []
    if rng.random() < bass_probability:
        parts.append(Part(program=rng.choice(song.style.basses), pan=64, volume=rng.randint(95, 115),
                          notes=bass(rng, song, start_bar=start_bar, seconds=seconds, velocity=rng.uniform(75, 100))))
    if song.kit is not None:
        parts.append(Part(program=song.kit, drums=True, pan=64, volume=rng.randint(90, 115),
                          notes=drums(rng, song, start_bar=start_bar, seconds=seconds, velocity=rng.uniform(85, 110))))
    return parts


def train_clips(seed: int, per_class: int) -> list[Clip]:
    """`per_class` 3 s excerpts per instrument, 1-3 excerpts per song, IRMAS names."""
    clips = []
    for code in INSTRUMENTS:
        rng = _rng(seed, "train", code)
        numbers = rng.sample(range(1, 10000), k=per_class)  # unique song numbers within the class
        made, song_index = 0, 0
        while made < per_class:
            excerpts = min(per_class - made, rng.choice((1, 2, 2, 3)))
            genre = _genre_for(rng, code)
            song_rng = _rng(seed, "train", code, song_index)
            song = new_song(song_rng, genre)
            tone = new_colour(_rng(seed, "colour", "train", code, song_index))
            drums_tag = WITH_DRUMS if song.kit is not None else NO_DRUMS
            tags = f"[{code}][{drums_tag}][{genre}]"
            if genre == GENRES[1] and song_rng.random() < 0.3:  # as in IRMAS, some classical names lack a drums tag
                tags = f"[{code}][{genre}]"
            prefix = f"{song_rng.randint(1, 199):03d}__" if song_rng.random() < 0.15 else ""
            lead_patch = song_rng.choice(TIMBRES[code].patches)
            lead_velocity = song_rng.uniform(80, 118)
            backing = [c for c in song.style.backing if INSTRUMENT_NAMES[code] != c]
            chosen = song_rng.sample(backing, k=min(len(backing), song_rng.choice((0, 1, 1, 2))))
            backing_codes = [c for c in INSTRUMENTS if INSTRUMENT_NAMES[c] in chosen]
            for excerpt in range(1, excerpts + 1):
                rng_x = _rng(seed, "train", code, song_index, excerpt)
                start_bar = (excerpt - 1) * song.bars(TRAIN_SECONDS) + rng_x.randrange(4)
                kwargs = dict(start_bar=start_bar, seconds=TRAIN_SECONDS)
                lead = _part(rng_x, song, code, "melody", velocity=lead_velocity, patch=lead_patch, **kwargs)
                lead.pan = rng_x.randint(50, 78)
                accompaniment = [_part(rng_x, song, c, _backing_role(c), velocity=rng_x.uniform(55, 85), **kwargs)
                                 for c in backing_codes]
                accompaniment += _rhythm_section(rng_x, song, bass_probability=0.8, **kwargs)
                stems = [[lead]] + ([accompaniment] if accompaniment else [])
                name = f"{prefix}{tags}{numbers[song_index]:04d}__{excerpt}.wav"
                clips.append(Clip(
                    path=f"{TRAIN_DIR}/{code}/{name}", seconds=TRAIN_SECONDS, stems=stems,
                    levels=[0.0, -rng_x.uniform(7.0, 13.0)][: len(stems)], loudness=-rng_x.uniform(14.0, 24.0),
                    tone=tone,
                    info={"instrument": code, "genre": genre, "drums": drums_tag, "tempo": song.tempo,
                          "backing": backing_codes, "programs": [p.program for stem in stems for p in stem]},
                ))
            made += excerpts
            song_index += 1
    return clips


TITLE_WORDS = {
    "adjective": ("Blue", "Midnight", "Golden", "Lonely", "Electric", "Quiet", "Wild", "Sweet", "Broken", "Silver",
                  "Early", "Little", "Crazy", "Velvet"),
    "noun": ("River", "Train", "Heart", "Morning", "Highway", "Rain", "Moon", "Garden", "Dance", "Road", "Fire",
             "Window", "Waltz", "Serenade", "Bossa", "Shuffle"),
    "name": ("Johnny", "Mary", "Ray", "Sally", "J.D.", "St. James", "Lou", "Rosa"),
    "verb": ("Stop", "Leave", "Call", "Forget", "Wake", "Hold"),
    "key": ("C", "D Minor", "E-flat", "G", "A Minor", "F-sharp", "B-flat Major"),
}
TITLE_FORMS = (
    "{adjective} {noun}", "The {noun} of {name}", "{noun} & {noun2}", "Don't {verb} Me Now", "Mr. {name}'s {noun}",
    "\"{noun}\" (live)", "{noun} in {key}, Op. {number}", "{name} - {adjective} {noun} No. {number}",
    "{adjective} {noun} (feat. {name})", "{verb} the {noun}, {name}",
)


def _title(rng: random.Random) -> str:
    words = {key: rng.choice(values) for key, values in TITLE_WORDS.items()}
    title = rng.choice(TITLE_FORMS).format(noun2=rng.choice(TITLE_WORDS["noun"]), number=rng.randint(1, 99), **words)
    track = rng.random()
    if track < 0.5:
        title = f"{rng.randint(1, 14):02d} - {title}"
    elif track < 0.65:
        title = f"{rng.randint(1, 14):02d}. {title}"
    elif track < 0.75:
        title = f"({rng.randint(1, 14):02d}) {title.lower()}"
    return title


def test_clips(seed: int, count: int) -> list[Clip]:
    """`count` 5-20 s excerpts of songs with 1-4 labelled instruments at comparable levels."""
    clips, titles, song_index = [], set(), 0
    while len(clips) < count:
        rng = _rng(seed, "test", song_index)
        title = _title(rng)
        while title in titles:
            title += " II"
        titles.add(title)
        genre = rng.choice(GENRES)
        song = new_song(rng, genre)
        tone = new_colour(_rng(seed, "colour", "test", song_index))
        weights = [1 + TIMBRES[c].genres.get(GENRE_NAMES[genre], 0) for c in INSTRUMENTS]
        size = rng.choices((1, 2, 3, 4), weights=(0.2, 0.35, 0.3, 0.15))[0]
        pool: list[str] = []
        while len(pool) < size:
            code = _weighted(rng, INSTRUMENTS, weights)
            if code not in pool:
                pool.append(code)
        patches = {code: rng.choice(TIMBRES[code].patches) for code in pool}
        excerpts = min(count - len(clips), rng.choice((1, 2, 2, 3, 4)))
        for excerpt in range(1, excerpts + 1):
            rng_x = _rng(seed, "test", song_index, excerpt)
            seconds = round(rng_x.uniform(*TEST_SECONDS), 2)
            start_bar = (excerpt - 1) * song.bars(TEST_SECONDS[1]) + rng_x.randrange(4)
            kwargs = dict(start_bar=start_bar, seconds=seconds)
            playing = list(pool)
            if len(playing) > 1 and rng_x.random() < 0.2:  # an instrument sits this excerpt out
                playing.remove(rng_x.choice(playing[1:]))
            stems, has_chords = [], False
            for k, code in enumerate(playing):  # a lead melody; the others comp, counter-melody or hold lines
                role, density = "melody", None
                if k > 0 and TIMBRES[code].chords and not has_chords and rng_x.random() < 0.7:
                    role, has_chords = "chords", True
                elif k > 0:
                    role, density = rng_x.choice((("melody", "slow"), ("melody", None), ("line", None)))
                stems.append([_part(rng_x, song, code, role, velocity=rng_x.uniform(80, 115), patch=patches[code],
                                    density=density, **kwargs)])
            levels = [rng_x.uniform(-3.0, 3.0) for _ in stems]
            rhythm = _rhythm_section(rng_x, song, bass_probability=0.6, **kwargs)
            if rhythm:
                stems.append(rhythm)
                levels.append(sum(levels) / len(levels) - rng_x.uniform(6.0, 10.0))
            clips.append(Clip(
                path=f"{TEST_DIR}/{TEST_INNER_DIR}/{title}-{excerpt}.wav", seconds=seconds, stems=stems,
                levels=levels, loudness=-rng_x.uniform(14.0, 22.0), labels=tuple(rng_x.sample(playing, len(playing))),
                label_suffix=rng_x.choice(("", "\t", "\t", " ")), tone=tone,
                info={"instruments": sorted(playing), "genre": genre, "drums": song.kit is not None,
                      "tempo": song.tempo},
            ))
        song_index += 1
    return clips


def unlabeled_clips(seed: int, count: int) -> list[Clip]:
    """`count` 3-12 s clips of random genres and instruments in one stem (no labels)."""
    clips = []
    for index in range(count):
        rng = _rng(seed, "unlabeled", index)
        genre = rng.choice(GENRES)
        song = new_song(rng, genre)
        seconds = round(rng.uniform(*UNLABELED_SECONDS), 2)
        kwargs = dict(start_bar=rng.randrange(8), seconds=seconds)
        codes = rng.sample(INSTRUMENTS, k=rng.choice((1, 2, 2, 3, 3, 4)))
        parts = [_part(rng, song, code, "melody" if k == 0 else rng.choice(("melody", _backing_role(code))),
                       velocity=rng.uniform(60, 115), **kwargs) for k, code in enumerate(codes)]
        for part in parts[1:]:
            part.volume = rng.randint(60, 110)
        parts += _rhythm_section(rng, song, bass_probability=0.6, **kwargs)
        clips.append(Clip(path=f"{UNLABELED_DIR}/track-{index + 1:05d}.wav", seconds=seconds, stems=[parts],
                          levels=[0.0], loudness=-rng.uniform(14.0, 26.0),
                          tone=new_colour(_rng(seed, "colour", "unlabeled", index)),
                          info={"genre": genre, "drums": song.kit is not None}))
    return clips


# --- Rendering ---------------------------------------------------------------------------


def _ticks(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_SECOND))


def stem_layout(stems: Sequence[tuple[float, list[Part]]]) -> list[int]:
    """Start tick of each (seconds, parts) stem when they are laid one after another, block-aligned, with a gap."""
    starts, tick = [], 0
    for seconds, _ in stems:
        starts.append(tick)
        tick += -(-_ticks(seconds + GAP_SECONDS) // ALIGN_TICKS) * ALIGN_TICKS
    return starts


def write_midi(stems: Sequence[tuple[float, list[Part]]], path: Path) -> list[int]:
    """One type-0 MIDI file playing the stems in turn; returns each stem's start tick (1 tick = 1 ms)."""
    starts = stem_layout(stems)
    events: list[tuple[int, int, mido.Message]] = []  # (tick, order, message): setup < note off < note on < kill
    for start, (seconds, parts) in zip(starts, stems):
        channels = iter(c for c in range(16) if c != DRUM_CHANNEL)
        for part in parts:
            channel = DRUM_CHANNEL if part.drums else next(channels)
            events += [
                (start, 0, mido.Message("program_change", channel=channel, program=part.program)),
                (start, 0, mido.Message("control_change", channel=channel, control=7, value=part.volume)),
                (start, 0, mido.Message("control_change", channel=channel, control=10, value=part.pan)),
            ]
            for note in part.notes:
                on, off = start + _ticks(note.start), start + max(_ticks(note.end), _ticks(note.start) + 1)
                events.append((on, 2, mido.Message("note_on", channel=channel, note=note.pitch,
                                                   velocity=note.velocity)))
                events.append((off, 1, mido.Message("note_off", channel=channel, note=note.pitch, velocity=0)))
        end = start + _ticks(seconds)
        for channel in range(16):  # silence everything at the stem's end, and reset for the next one
            events.append((end, 3, mido.Message("control_change", channel=channel, control=120, value=0)))
            events.append((end, 3, mido.Message("control_change", channel=channel, control=121, value=0)))
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=1_000_000, time=0)])
    last = 0
    for tick, _, message in events:
        track.append(message.copy(time=tick - last))
        last = tick
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_SECOND)
    midi.tracks.append(track)
    midi.save(path)
    return starts


def fluidsynth(midi: Path, wav: Path, soundfont: Path) -> None:
    """Render `midi` to float stereo wav at 44.1 kHz; no reverb or chorus (their tails would cross stems)."""
    command = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.5", "-r", str(SAMPLE_RATE),
               "-o", "synth.dynamic-sample-loading=1", "-o", "synth.polyphony=512",
               "-T", "wav", "-O", "float", "-F", str(wav), str(soundfont), str(midi)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wav.exists():
        message = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"fluidsynth failed on {midi.name} (exit {result.returncode}): "
                           f"{message[-1] if message else 'no output'}")


def render_stems(stems: Sequence[tuple[float, list[Part]]], soundfont: Path, workdir: Path) -> list[np.ndarray]:
    """Each stem as a (frames, 2) float32 array, rendered together by one FluidSynth process."""
    midi, wav = workdir / "batch.mid", workdir / "batch.wav"
    starts = write_midi(stems, midi)
    fluidsynth(midi, wav, soundfont)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE, rate
    out = []
    for start, (seconds, _) in zip(starts, stems):
        first, frames = round(start * SAMPLE_RATE / TICKS_PER_SECOND), round(seconds * SAMPLE_RATE)
        piece = audio[first: first + frames]
        out.append(np.pad(piece, ((0, frames - len(piece)), (0, 0))))
    return out


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def mix(clip: Clip, stems: Sequence[np.ndarray], soundfont: Path) -> np.ndarray:
    """Colour each stem, scale it to its level (by RMS), sum, set the loudness and keep the peak below full scale."""
    total = np.zeros_like(stems[0], dtype=np.float64)
    for audio, level in zip((colour(stem, clip.tone) for stem in stems), clip.levels):
        rms = _rms(audio)
        if rms < 1e-6:
            raise UserError(f"{soundfont}: rendered silence for programs "
                            f"{sorted({p.program for stem in clip.stems for p in stem})} of {clip.path}; "
                            "pass --soundfont with a complete General MIDI SoundFont")
        total += audio * (10 ** (level / 20) / rms)
    total *= 10 ** (clip.loudness / 20) / _rms(total)
    peak = float(np.max(np.abs(total)))
    if peak > 0.97:
        total *= 0.97 / peak
    return total.astype(np.float32)


def render_batch(clips: Sequence[Clip], soundfont: Path, out: Path) -> list[dict]:
    """Render, mix and write a batch of clips (atomically: temp name, then rename); their summaries."""
    with tempfile.TemporaryDirectory(prefix="timbre-synth-") as tmp:
        stems = render_stems([(clip.seconds, parts) for clip in clips for parts in clip.stems], soundfont, Path(tmp))
    summaries, cursor = [], 0
    for clip in clips:
        audio = mix(clip, stems[cursor: cursor + len(clip.stems)], soundfont)
        cursor += len(clip.stems)
        path = out / clip.path
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        sf.write(temp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        os.replace(temp, path)
        if clip.labels:
            path.with_suffix(".txt").write_text("".join(f"{code}{clip.label_suffix}\n" for code in clip.labels))
        summaries.append({"path": clip.path, "seconds": clip.seconds, "soundfont": soundfont.name, **clip.info})
    return summaries


def batches(clips: Sequence[Clip], seconds: float = BATCH_SECONDS) -> list[list[Clip]]:
    """Consecutive clips grouped up to `seconds` of stem audio: fixed by the clip list, not by the workers."""
    groups: list[list[Clip]] = [[]]
    used = 0.0
    for clip in clips:
        length = clip.seconds * len(clip.stems)
        if groups[-1] and used + length > seconds:
            groups.append([])
            used = 0.0
        groups[-1].append(clip)
        used += length
    return [group for group in groups if group]


# --- Entry points --------------------------------------------------------------------------


def bundled_soundfont() -> Path:
    """TimGM6mb.sf2, the small GM SoundFont inside pretty_midi's wheel (a second timbre set for cross-font tests)."""
    import pretty_midi

    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


def default_soundfont() -> Path:
    """FluidR3_GM when the system has it (fluid-soundfont-gm), else pretty_midi's TimGM6mb."""
    return FLUIDR3 if FLUIDR3.exists() else bundled_soundfont()


def check_tools(soundfont: Path) -> None:
    """Fail early, in one line, when FluidSynth or the SoundFont is missing or not a SoundFont (.sf2 or .sf3)."""
    if shutil.which("fluidsynth") is None:
        raise UserError(f"fluidsynth: program not found on PATH; {INSTALL_HINT}")
    if not soundfont.is_file():
        raise UserError(f"{soundfont}: SoundFont not found; pass --soundfont with General MIDI .sf2/.sf3 files "
                        f"or {INSTALL_HINT}")
    try:
        with open(soundfont, "rb") as handle:
            header = handle.read(12)
    except OSError as error:
        raise UserError(f"{soundfont}: cannot read the SoundFont ({error.strerror}); check its permissions") from None
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":  # .sf3 keeps the .sf2 container, with compressed samples
        raise UserError(f"{soundfont}: not a SoundFont file (.sf2 or .sf3); pass --soundfont with General MIDI "
                        "SoundFonts")


def font_plan(clips: Sequence[Clip], fonts: Sequence[Path], seed: int) -> list[tuple[Path, list[Clip]]]:
    """Each clip draws one of `fonts` (seeded by its path); batches of clips that share a font, in a fixed order."""
    chosen: dict[Path, list[Clip]] = {font: [] for font in fonts}
    for clip in clips:
        chosen[fonts[_rng(seed, "soundfont", clip.path).randrange(len(fonts))]].append(clip)
    return [(font, group) for font in fonts for group in batches(chosen[font])]


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
               seed: int = 0, soundfonts: Sequence[str | os.PathLike] = (), workers: int | None = None,
               progress: bool = True) -> dict:
    """Render the data set under `out` and return (and write) its synth.json summary.

    Every clip is rendered with one of `soundfonts` (drawn per clip; default: `default_soundfont()`), so a set
    rendered with several General MIDI fonts shows each instrument in several timbres.

    Rerunning with the same options finds the complete tree and does nothing; other options
    replace the tree an earlier run wrote there.
    """
    for name, value in (("--train-per-class", train_per_class), ("--test-files", test_files),
                        ("--unlabeled", unlabeled)):
        if value < 0:
            raise UserError(f"{name}: {value} is negative; pass a count >= 0")
    out = Path(out)
    fonts = [Path(font) for font in soundfonts] or [default_soundfont()]
    for font in fonts:
        check_tools(font)
    if len({font.resolve() for font in fonts}) < len(fonts):
        raise UserError(f"--soundfont: {' '.join(map(str, fonts))} names a SoundFont twice; pass each once")
    options = {"train_per_class": train_per_class, "test_files": test_files, "unlabeled": unlabeled, "seed": seed,
               "soundfonts": [str(font.resolve()) for font in fonts], "sample_rate": SAMPLE_RATE}
    if _prepare(out, options):
        return json.loads((out / SUMMARY).read_text())
    plans = {"train": train_clips(seed, train_per_class), "test": test_clips(seed, test_files),
             "unlabeled": unlabeled_clips(seed, unlabeled)}
    clips = [clip for split in plans.values() for clip in split]
    groups = font_plan(clips, fonts, seed)
    workers = max(1, min(workers or os.cpu_count() or 1, len(groups) or 1))
    started = time.perf_counter()
    summaries: list[dict] = []
    bar = progress_bar(total=len(clips), desc="synth", unit="clip", enabled=progress)
    if workers == 1:
        for font, group in groups:
            summaries += render_batch(group, font, out)
            bar.update(len(group))
    else:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = [pool.apply_async(render_batch, (group, font, out)) for font, group in groups]
            for (_, group), result in zip(groups, results):
                summaries += result.get()
                bar.update(len(group))
    bar.close()
    elapsed = time.perf_counter() - started
    by_path = {item["path"]: item for item in summaries}
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
        "soundfonts": _counts(summaries, "soundfont"),
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
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="FluidSynth processes in parallel (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = synthesize(args.out, train_per_class=args.train_per_class, test_files=args.test_files,
                         unlabeled=args.unlabeled, seed=args.seed, soundfonts=args.soundfont, workers=args.workers,
                         progress=not args.quiet)
    counts, seconds = summary["counts"], summary["seconds"]
    took = f" in {summary['render_seconds']:.1f} s" if "render_seconds" in summary else " (already rendered)"
    print(f"{args.out}: {counts['train']} training clips, {counts['test']} test files, {counts['unlabeled']} unlabeled "
          f"clips ({sum(seconds.values()):.0f} s of audio){took}; soundfonts "
          f"{', '.join(Path(font).name for font in summary['options']['soundfonts'])}")
    return 0
