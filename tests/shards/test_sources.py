"""Sources turn IRMAS-layout trees (with the real awkward names), folders and CSVs into records and skips."""

from __future__ import annotations

import re

import pytest

from core.errors import UserError
from shards.sources import make_key, scan

KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def check_against(tree, found, *, decode_time: set[str] = frozenset()):
    """Every expected file is a record with its labels; every scan-time bad input is a skip with its reason."""
    records = {r.relpath: r for r in found.records}
    for relpath, labels in tree.expected.items():
        record = records[relpath]
        assert list(record.instruments) == labels["instruments"], relpath
        assert record.genre == labels["genre"], relpath
        assert record.drums == labels["drums"], relpath
        if labels["song"] is not None:
            assert record.song == labels["song"], relpath
    skips = {s.path: s.reason for s in found.skips}
    for relpath, word in tree.skips.items():
        if relpath in decode_time:
            assert relpath in records  # audio problems are found when packing, not when scanning
        else:
            assert word in skips[relpath].lower(), (relpath, skips[relpath])
            assert "\n" not in skips[relpath]
    assert found.inputs == tree.inputs
    keys = [r.key for r in found.records]
    assert len(set(keys)) == len(keys)
    assert all(KEY.match(k) for k in keys)


DECODE_WORDS = {"empty", "corrupt", "truncated", "not decodable audio", "unreadable", "silent", "nan", "no audio samples"}


def decode_time(tree) -> set[str]:
    return {path for path, word in tree.skips.items() if word in DECODE_WORDS}


def test_irmas_train_names_tags_and_songs(irmas, tmp_path):
    tree = irmas.bad_inputs(irmas.train(tmp_path, seconds=0.1), layout="train", seconds=0.1)
    found = scan("irmas-train", tree.root)
    check_against(tree, found, decode_time=decode_time(tree))
    songs = {r.relpath: r.song for r in found.records}
    # the __N excerpts of one recording share a song; the 008__ prefix names the same recording
    assert songs["cel/[cel][nod][cla]0058__1.wav"] == songs["cel/[cel][nod][cla]0058__2.wav"]
    assert songs["cel/008__[cel][nod][cla]0058__1.wav"] == songs["cel/[cel][nod][cla]0058__1.wav"]
    assert songs["cla/[cla][cla]0189__2.wav"] != songs["cel/[cel][nod][cla]0058__1.wav"]
    assert found.ignored == ["README.txt"]
    # the parent of IRMAS-TrainingData works too
    assert [r.relpath for r in scan("irmas-train", tmp_path).records] == [r.relpath for r in found.records]


def test_irmas_test_labels_orphans_and_songs(irmas, tmp_path):
    tree = irmas.bad_inputs(irmas.test(tmp_path, seconds=0.1), layout="test", seconds=0.1)
    found = scan("irmas-test", tree.root)
    check_against(tree, found, decode_time=decode_time(tree))
    by_song: dict[str, set[str]] = {}
    for record in found.records:
        by_song.setdefault(record.song, set()).add(record.relpath.rsplit("/", 1)[-1])
    song = "Mr. Brightside (feat. J.D.)"
    assert by_song[song] == {f"{song}-1.wav", f"{song}-2.wav"}
    assert "Simon & Garfunkel, The Boxer" in by_song and '"Heroes" (live)' in by_song
    # one part on its own (what `make demo` packs) is a valid input as well
    part = scan("irmas-test", tree.root / "IRMAS-TestingData-Part2")
    assert part.records and all(r.relpath.startswith("IRTestingData-Part2/") for r in part.records)


def test_folder_is_unlabeled_and_keeps_other_files_listed(irmas, tmp_path):
    tree = irmas.folder(tmp_path, seconds=0.2)
    found = scan("folder", tree.root)
    check_against(tree, found)
    assert found.ignored == ["album one/cover.jpg", "album one/notes.txt"]
    assert all(r.song == r.relpath and r.instruments == () for r in found.records)


def test_csv_rows_and_bad_rows(irmas, tmp_path):
    csv_path, tree = irmas.csv(tmp_path, seconds=0.1)
    with open(csv_path, "a") as handle:
        handle.write("audio/clip 1.wav,cel,,\n,cel,,\n")
    found = scan("csv", csv_path)
    check_against_extra = {s.path: s.reason for s in found.skips}
    assert "duplicate" in check_against_extra["audio/clip 1.wav"]
    assert any("empty path" in reason for reason in check_against_extra.values())
    tree.skips["audio/clip 1.wav"] = "duplicate"
    tree.skips["empty row"] = "empty path"
    records = {r.relpath: r for r in found.records}
    for relpath, labels in tree.expected.items():
        assert list(records[relpath].instruments) == labels["instruments"]
        assert records[relpath].genre == labels["genre"] and records[relpath].song == labels["song"]
    assert found.inputs == tree.inputs
    (tmp_path / "bad.csv").write_text("file,label\nx.wav,cel\n")
    with pytest.raises(UserError, match="bad.csv: no 'path' column"):
        scan("csv", tmp_path / "bad.csv")


def test_keys_are_safe_unique_and_deterministic():
    names = ["a.b c/x.wav", "a_b c/x.wav", "a.b.c/x.wav", "ü/ß.wav", "...wav", "[cel][nod][cla]0058__1.wav"]
    keys = [make_key(n) for n in names]
    assert keys == [make_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    assert all(KEY.match(k) for k in keys)


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown source"):
        scan("irmas", tmp_path)
    with pytest.raises(UserError, match="input directory not found") as error:
        scan("folder", tmp_path / "nope")
    assert "\n" not in str(error.value) and str(tmp_path / "nope") in str(error.value)
