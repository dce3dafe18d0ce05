"""Song-grouped, multi-label stratified train/val split.

Excerpts of one recording are near-duplicates, so a split by excerpt leaks the validation
set into training. We stratify whole songs instead: each song is one row whose labels are
the union of its excerpts' instruments and genres, and iterative stratification
(Sechidis et al., 2011, via `iterative-stratification`) picks the validation songs so each
class keeps close to `fraction` of its songs in validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from shards.errors import UserError
from shards.sources import Record
from shards.vocab import GENRES, genre_index, multi_hot

TRAIN, VAL = "train", "val"


def song_labels(records: Sequence[Record]) -> tuple[list[str], np.ndarray]:
    """Sorted song ids and their (songs, instruments + genres) 0/1 label union."""
    songs = sorted({r.song for r in records})
    row = {song: i for i, song in enumerate(songs)}
    labels = np.zeros((len(songs), multi_hot(()).size + len(GENRES)), dtype=np.int64)
    for record in records:
        labels[row[record.song], : multi_hot(()).size] |= multi_hot(record.instruments).astype(np.int64)
        if record.genre is not None:
            labels[row[record.song], multi_hot(()).size + genre_index(record.genre)] = 1
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
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_songs, random_state=seed)
    _, val_rows = next(splitter.split(np.zeros(len(songs)), labels))
    chosen = {songs[i] for i in val_rows}
    return [VAL if r.song in chosen else TRAIN for r in records]
