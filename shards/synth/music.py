"""The music of the synthetic set: General MIDI patches per IRMAS instrument, genre styles, songs (key, scale, tempo,
metre, chords, groove) and the parts players play in them (melody, chords, lines, bass, drums); a recording's EQ tone.

Everything here is drawn from a `random.Random`, so a seed fixes the music note for note.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shards.vocab import DRUMS, GENRE_NAMES, GENRES, INSTRUMENT_NAMES, INSTRUMENTS

WITH_DRUMS, NO_DRUMS = DRUMS


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
