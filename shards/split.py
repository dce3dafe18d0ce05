"""Song-grouped, multi-label stratified train/val split.

Excerpts of one recording are near-duplicates, so a split by excerpt leaks the validation
set into training. We stratify whole songs instead: each song is one row whose labels are
the union of its excerpts' instruments and genres, and iterative stratification
(Sechidis et al., 2011, via `iterative-stratification`) picks the validation songs so each
class keeps close to `fraction` of its songs in validation. A single draw can still miss a
class by several points (and, on small sets, the overall size), so we draw several and
keep the one whose excerpt counts are closest to `fraction` overall and per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from core.errors import UserError
from shards.sources import Record
from shards.vocab import GENRES, NUM_INSTRUMENTS, genre_index, multi_hot

TRAIN, VAL = "train", "val"
CANDIDATES = 16  # stratified draws to choose from: the best is several times closer to the fraction than one draw


def song_labels(records: Sequence[Record]) -> tuple[list[str], np.ndarray]:
    """Sorted song ids and their (songs, instruments + genres) 0/1 label union."""
    songs = sorted({r.song for r in records})
    row = {song: i for i, song in enumerate(songs)}
    labels = np.zeros((len(songs), NUM_INSTRUMENTS + len(GENRES)), dtype=np.int64)
    for record, excerpt in zip(records, excerpt_labels_of(records)):
        labels[row[record.song]] |= excerpt
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
    candidates = [{songs[i] for i in rows} for _, rows in splitter.split(np.zeros(len(songs)), labels)]
    # judge the candidates on excerpts, which is what training and the stats table count
    song_of = np.array([r.song for r in records])
    excerpt_labels = np.concatenate([np.ones((len(records), 1), dtype=np.int64), excerpt_labels_of(records)], axis=1)
    chosen = min(candidates, key=lambda val: _imbalance(excerpt_labels, np.isin(song_of, list(val)), fraction))
    return [VAL if r.song in chosen else TRAIN for r in records]


def excerpt_labels_of(records: Sequence[Record]) -> np.ndarray:
    """(records, instruments + genres) 0/1 labels of each excerpt."""
    labels = np.zeros((len(records), NUM_INSTRUMENTS + len(GENRES)), dtype=np.int64)
    for i, record in enumerate(records):
        labels[i, :NUM_INSTRUMENTS] = multi_hot(record.instruments)
        if record.genre is not None:
            labels[i, NUM_INSTRUMENTS + genre_index(record.genre)] = 1
    return labels


def _imbalance(labels: np.ndarray, in_val: np.ndarray, fraction: float) -> float:
    """How far the validation share is from `fraction`: overall + mean over instruments + mean over genres.

    Column 0 of `labels` is all ones (the overall size), then instruments, then genres; absent labels don't count.
    """
    totals = labels.sum(axis=0)
    gap = np.abs(labels[in_val].sum(axis=0) / np.maximum(totals, 1) - fraction)
    groups = (slice(0, 1), slice(1, 1 + NUM_INSTRUMENTS), slice(1 + NUM_INSTRUMENTS, None))
    return float(sum(gap[g][totals[g] > 0].mean() for g in groups if (totals[g] > 0).any()))
