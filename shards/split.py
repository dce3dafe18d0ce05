"""Song-grouped, multi-label stratified train/val split.

Excerpts of one recording are near-duplicates, so a split by excerpt leaks the validation
set into training. We stratify whole songs instead: each song is one row whose labels are
the union of its excerpts' instruments and genres, and iterative stratification
(Sechidis et al., 2011, via `iterative-stratification`) picks the validation songs so each
class keeps close to `fraction` of its songs in validation. A single draw can still miss a
class by several points, so we draw a few and keep the most balanced one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from shards.errors import UserError
from shards.sources import Record
from shards.vocab import GENRES, NUM_INSTRUMENTS, genre_index, multi_hot

TRAIN, VAL = "train", "val"
CANDIDATES = 8  # stratified draws to choose from: the best of 8 is ~3x closer to the fraction than one draw


def song_labels(records: Sequence[Record]) -> tuple[list[str], np.ndarray]:
    """Sorted song ids and their (songs, instruments + genres) 0/1 label union."""
    songs = sorted({r.song for r in records})
    row = {song: i for i, song in enumerate(songs)}
    labels = np.zeros((len(songs), NUM_INSTRUMENTS + len(GENRES)), dtype=np.int64)
    for record in records:
        labels[row[record.song], : NUM_INSTRUMENTS] |= multi_hot(record.instruments).astype(np.int64)
        if record.genre is not None:
            labels[row[record.song], NUM_INSTRUMENTS + genre_index(record.genre)] = 1
    return songs, labels


def split_by_song(records: Sequence[Record], *, fraction: float, seed: int) -> list[str]:
    """The split ("train" or "val") of each record; no song is in both; deterministic for `seed`."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction {fraction}: must be between 0 and 1 (exclusive), e.g. 0.2")
    songs, labels = song_labels(records)
    if len(songs) < 2:
        raise UserError(f"--val-fraction needs at least 2 songs to split, the input has {len(songs)}; "
                        "drop --val-fraction or add more recordings")
    val_songs = max(1, min(len(songs) - 1, int(round(fraction * len(songs)))))
    splitter = MultilabelStratifiedShuffleSplit(n_splits=CANDIDATES, test_size=val_songs, random_state=seed)
    candidates = [val_rows for _, val_rows in splitter.split(np.zeros(len(songs)), labels)]
    chosen = {songs[i] for i in min(candidates, key=lambda rows: _imbalance(labels, rows, fraction))}
    return [VAL if r.song in chosen else TRAIN for r in records]


def _imbalance(labels: np.ndarray, val_rows: np.ndarray, fraction: float) -> tuple[float, float]:
    """(worst instrument, worst instrument-or-genre) distance of the validation share from `fraction`."""
    share = labels[val_rows].sum(axis=0) / np.maximum(labels.sum(axis=0), 1)
    gap = np.where(labels.sum(axis=0) > 0, np.abs(share - fraction), 0.0)
    return float(gap[: NUM_INSTRUMENTS].max()), float(gap.max())
