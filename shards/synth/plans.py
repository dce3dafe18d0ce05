"""Clip plans: which clips the synthetic set holds (IRMAS-like training excerpts, polyphonic test files, unlabelled
tracks), each as stems of parts with levels, a loudness and a recording tone; no audio is made here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from shards.sources import TRAIN_DIR
from shards.synth.music import (
    NO_DRUMS,
    TIMBRES,
    WITH_DRUMS,
    Colour,
    Part,
    Patch,
    Song,
    bass,
    chords,
    drums,
    line,
    melody,
    new_colour,
    new_song,
)
from shards.vocab import GENRE_NAMES, GENRES, INSTRUMENT_NAMES, INSTRUMENTS

TRAIN_SECONDS = 3.0
TEST_SECONDS = (5.0, 20.0)
UNLABELED_SECONDS = (3.0, 12.0)
TEST_DIR = "IRMAS-TestingData-Part1"
TEST_INNER_DIR = "Part1"
UNLABELED_DIR = "unlabeled"


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


# --- Clip plans ----------------------------------------------------------------------------


def seeded_rng(seed: int, *names: object) -> random.Random:
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
        rng = seeded_rng(seed, "train", code)
        numbers = rng.sample(range(1, 10000), k=per_class)  # unique song numbers within the class
        made, song_index = 0, 0
        while made < per_class:
            excerpts = min(per_class - made, rng.choice((1, 2, 2, 3)))
            genre = _genre_for(rng, code)
            song_rng = seeded_rng(seed, "train", code, song_index)
            song = new_song(song_rng, genre)
            tone = new_colour(seeded_rng(seed, "colour", "train", code, song_index))
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
                rng_x = seeded_rng(seed, "train", code, song_index, excerpt)
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
        rng = seeded_rng(seed, "test", song_index)
        title = _title(rng)
        while title in titles:
            title += " II"
        titles.add(title)
        genre = rng.choice(GENRES)
        song = new_song(rng, genre)
        tone = new_colour(seeded_rng(seed, "colour", "test", song_index))
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
            rng_x = seeded_rng(seed, "test", song_index, excerpt)
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
        rng = seeded_rng(seed, "unlabeled", index)
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
                          tone=new_colour(seeded_rng(seed, "colour", "unlabeled", index)),
                          info={"genre": genre, "drums": song.kit is not None}))
    return clips
