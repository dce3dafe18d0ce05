"""The train/val split keeps songs whole, follows the labels and is reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import UserError
from shards.sources import Record, make_key
from shards.split import TRAIN, VAL, split_by_song
from shards.vocab import GENRES, INSTRUMENTS


def records(songs: int = 300, seed: int = 0) -> list[Record]:
    """Songs with 1-5 excerpts each, a skewed predominant class (like IRMAS), a second label half the time."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(3.0, 1.0, len(INSTRUMENTS))
    result = []
    for s in range(songs):
        main = rng.choice(len(INSTRUMENTS), p=weights / weights.sum())
        labels = {INSTRUMENTS[main]} | ({INSTRUMENTS[rng.integers(len(INSTRUMENTS))]} if rng.random() < 0.5 else set())
        genre = GENRES[rng.integers(len(GENRES))]
        for k in range(int(rng.integers(1, 6))):
            relpath = f"{INSTRUMENTS[main]}/song{s:04d}__{k}.wav"
            result.append(Record(path=Path(relpath), relpath=relpath, source="irmas-train",
                                 instruments=tuple(sorted(labels)), genre=genre, drums=None,
                                 song=f"song{s:04d}", key=make_key(relpath)))
    return result


def test_songs_stay_whole_and_classes_follow_the_fraction():
    data = records()
    splits = split_by_song(data, fraction=0.2, seed=0)
    song_split: dict[str, set[str]] = {}
    for record, split in zip(data, splits):
        song_split.setdefault(record.song, set()).add(split)
    assert all(len(s) == 1 for s in song_split.values())
    val_songs = {song for song, s in song_split.items() if s == {VAL}}
    assert abs(len(val_songs) / len(song_split) - 0.2) < 0.01
    for code in INSTRUMENTS:
        songs = {r.song for r in data if code in r.instruments}
        share = len(songs & val_songs) / len(songs)
        assert abs(share - 0.2) < 0.03, (code, share, len(songs))
    for genre in GENRES:
        songs = {r.song for r in data if r.genre == genre}
        assert abs(len(songs & val_songs) / len(songs) - 0.2) < 0.05, genre


def test_deterministic_for_a_seed_and_different_across_seeds():
    data = records(120)
    first = split_by_song(data, fraction=0.25, seed=3)
    assert split_by_song(list(data), fraction=0.25, seed=3) == first
    assert split_by_song(data, fraction=0.25, seed=4) != first
    assert set(first) == {TRAIN, VAL}


def test_unlabeled_songs_split_too():
    data = [Record(path=Path(f"{i}.wav"), relpath=f"{i}.wav", source="folder", instruments=(), genre=None,
                   drums=None, song=f"{i}.wav", key=make_key(f"{i}.wav")) for i in range(20)]
    assert split_by_song(data, fraction=0.1, seed=0).count(VAL) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_out_of_range_is_a_user_error(fraction):
    with pytest.raises(UserError, match="--val-fraction"):
        split_by_song(records(10), fraction=fraction, seed=0)


def test_one_song_cannot_be_split():
    with pytest.raises(UserError, match="at least 2 songs"):
        split_by_song(records(1)[:1], fraction=0.2, seed=0)
