"""The one place that spells IRMAS label codes: instruments, their families, genres and drums.

Every other module asks this one for indices, names and multi-hot vectors, so a new
vocabulary (or a typo) can only ever be introduced here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

INSTRUMENTS: tuple[str, ...] = ("cel", "cla", "flu", "gac", "gel", "org", "pia", "sax", "tru", "vio", "voi")

INSTRUMENT_NAMES: dict[str, str] = {
    "cel": "cello",
    "cla": "clarinet",
    "flu": "flute",
    "gac": "acoustic guitar",
    "gel": "electric guitar",
    "org": "organ",
    "pia": "piano",
    "sax": "saxophone",
    "tru": "trumpet",
    "vio": "violin",
    "voi": "voice",
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "strings": ("cel", "vio"),
    "guitars": ("gac", "gel"),
    "woodwinds": ("cla", "flu", "sax"),
    "brass": ("tru",),
    "keyboards": ("org", "pia"),
    "voice": ("voi",),
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
FAMILY_OF: dict[str, str] = {code: family for family, codes in FAMILIES.items() for code in codes}

GENRES: tuple[str, ...] = ("cou_fol", "cla", "pop_roc", "lat_sou", "jaz_blu")
GENRE_NAMES: dict[str, str] = {
    "cou_fol": "country-folk",
    "cla": "classical",
    "pop_roc": "pop-rock",
    "lat_sou": "latin-soul",
    "jaz_blu": "jazz-blues",
}

DRUMS: tuple[str, ...] = ("dru", "nod")

NUM_INSTRUMENTS = len(INSTRUMENTS)
NUM_FAMILIES = len(FAMILY_NAMES)
NUM_GENRES = len(GENRES)


class UnknownLabel(ValueError):
    """A code that is not part of the IRMAS vocabulary."""


def instrument_index(code: str) -> int:
    try:
        return INSTRUMENTS.index(code)
    except ValueError:
        raise UnknownLabel(f"unknown instrument code {code!r} (known: {' '.join(INSTRUMENTS)})") from None


def family_index(code: str) -> int:
    """Index of the family that instrument `code` belongs to."""
    return FAMILY_NAMES.index(FAMILY_OF[INSTRUMENTS[instrument_index(code)]])


def genre_index(genre: str | None) -> int:
    """Index of `genre`, or -1 when the genre is unknown (None)."""
    if genre is None:
        return -1
    try:
        return GENRES.index(genre)
    except ValueError:
        raise UnknownLabel(f"unknown genre code {genre!r} (known: {' '.join(GENRES)})") from None


def parse_instruments(text: str | Iterable[str]) -> tuple[str, ...]:
    """Codes from a label file, a CSV cell ('cel vio', 'cel,vio') or a list; sorted, unique, validated."""
    tokens = text.replace(",", " ").split() if isinstance(text, str) else [t.strip() for t in text]
    codes = sorted({t for t in tokens if t})
    for code in codes:
        instrument_index(code)
    return tuple(codes)


def multi_hot(codes: Iterable[str]) -> np.ndarray:
    """(11,) float32 vector with a 1 for each instrument present."""
    vector = np.zeros(NUM_INSTRUMENTS, dtype=np.float32)
    for code in codes:
        vector[instrument_index(code)] = 1.0
    return vector


def family_multi_hot(codes: Iterable[str]) -> np.ndarray:
    """(6,) float32 vector with a 1 for each instrument family present."""
    vector = np.zeros(NUM_FAMILIES, dtype=np.float32)
    for code in codes:
        vector[family_index(code)] = 1.0
    return vector
