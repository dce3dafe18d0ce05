"""Input sources: walk a tree (or read a CSV) into labelled records and one-line skips.

Scanning never decodes audio; it only reads names, folders and label files, so every
problem it finds is reported here and every problem in the audio itself is reported by
`shards.audio` when the file is packed. Records come out sorted by path, so a pack of the
same input is the same whatever order the file system lists it in.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from shards.vocab import DRUMS, UnknownLabel, genre_index, instrument_index, parse_instruments

SOURCES: tuple[str, ...] = ("irmas-train", "irmas-test", "folder", "csv")
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".w64", ".caf"}
)
LABEL_EXTENSION = ".txt"
TRAIN_DIR = "IRMAS-TrainingData"

# [ins][drums?][genre]NNNN__K, optionally prefixed with NNN__ (both spellings exist in IRMAS)
TRAIN_NAME = re.compile(r"^(?:\d+__)?(?P<tags>(?:\[[^\[\]]*\])+)\s*(?P<number>\d+)__(?P<excerpt>\d+)$")
TEST_EXCERPT = re.compile(r"^(?P<song>.*?)-\d+$")


@dataclass(frozen=True, kw_only=True)
class Record:
    """One input file to pack: where it is and what it is labelled."""

    path: Path  # absolute path to read
    relpath: str  # path relative to INPUT, as stored in the sample's json
    source: str
    instruments: tuple[str, ...]
    genre: str | None
    drums: str | None
    song: str
    key: str


@dataclass(frozen=True, kw_only=True)
class Skip:
    """An input that was not packed, and why (one line)."""

    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Scan:
    records: list[Record]
    skips: list[Skip]
    ignored: list[str]  # files that are not inputs at all (README.txt, cover.jpg, ...)

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.skips)


def make_key(relpath: str) -> str:
    """WebDataset-safe key: readable slug of the path + a short hash that makes it unique."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", os.path.splitext(relpath)[0]).strip("_")[-60:].lstrip("_")
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}" if slug else digest


def scan(source: str, input_path: str | os.PathLike) -> Scan:
    """Records and skips of `source` under `input_path` (a directory, or the CSV file for `csv`)."""
    if source not in SOURCES:
        raise UserError(f"{source}: unknown source; choose one of {', '.join(SOURCES)}")
    root = Path(input_path)
    if source == "csv":
        if not root.is_file():
            raise UserError(f"{root}: CSV manifest not found; pass the path of an existing .csv file")
        result = _scan_csv(root)
    else:
        if not root.is_dir():
            raise UserError(f"{root}: input directory not found; pass the folder that holds the {source} audio")
        scanner = {"irmas-train": _scan_irmas_train, "irmas-test": _scan_irmas_test, "folder": _scan_folder}[source]
        result = scanner(root)
    keys: dict[str, str] = {}
    for record in result.records:
        if record.key in keys:
            raise AssertionError(f"key collision between {keys[record.key]!r} and {record.relpath!r}")
        keys[record.key] = record.relpath
    return Scan(
        records=sorted(result.records, key=lambda r: r.relpath),
        skips=sorted(result.skips, key=lambda s: (s.path, s.reason)),
        ignored=sorted(result.ignored),
    )


def audio_files(folder: str | os.PathLike) -> list[Path]:
    """The audio files under `folder` (recursively, hidden entries excluded), sorted; a UserError when there are none."""
    found = [Path(folder) / relpath for relpath in _walk(Path(folder)) if _is_audio(relpath)]
    if not found:
        raise UserError(f"{folder}: no audio files in this folder ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    return found


def _walk(root: Path) -> list[str]:
    """Every file (and dangling link) under `root`, relative POSIX paths, hidden entries excluded."""
    found = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(directory).relative_to(root)
        found += [(base / name).as_posix() for name in filenames if not name.startswith(".")]
    return sorted(found)


def _is_audio(relpath: str) -> bool:
    return os.path.splitext(relpath)[1].lower() in AUDIO_EXTENSIONS


def _record(root: Path, relpath: str, source: str, **labels) -> Record:
    return Record(path=root / relpath, relpath=relpath, source=source, key=make_key(relpath), **labels)


def _scan_irmas_train(root: Path) -> Scan:
    """IRMAS-TrainingData/<code>/[ins][drums?][genre]NNNN__K.wav: label from the folder, genre/drums from the tags."""
    if not any(p.is_dir() and _is_known_instrument(p.name) for p in root.iterdir()) and (root / TRAIN_DIR).is_dir():
        root = root / TRAIN_DIR
    records, skips, ignored = [], [], []
    for relpath in _walk(root):
        if not _is_audio(relpath):
            ignored.append(relpath)
            continue
        parts = relpath.split("/")
        if len(parts) < 2:
            skips.append(Skip(path=relpath, reason="not inside an instrument folder (IRMAS uses <code>/<name>.wav)"))
            continue
        folder, stem = parts[0], os.path.splitext(parts[-1])[0]
        try:
            instrument_index(folder)
            genre, drums, song = _train_tags(stem)
        except UnknownLabel as error:
            skips.append(Skip(path=relpath, reason=f"{error} (from the name {relpath!r})"))
            continue
        records.append(
            _record(root, relpath, "irmas-train", instruments=(folder,), genre=genre, drums=drums,
                    song=f"{folder}/{song}")
        )
    return Scan(records=records, skips=skips, ignored=ignored)


def _is_known_instrument(code: str) -> bool:
    try:
        instrument_index(code)
    except UnknownLabel:
        return False
    return True


def _train_tags(stem: str) -> tuple[str | None, str | None, str]:
    """(genre, drums, song) from an IRMAS training file name; unparseable names keep no genre and their own song."""
    match = TRAIN_NAME.match(stem)
    if match is None:
        return None, None, stem
    tags = re.findall(r"\[([^\[\]]*)\]", match["tags"])
    drums = next((tag for tag in tags[1:-1] if tag in DRUMS), None)
    genre = tags[-1] if len(tags) > 1 else None
    genre_index(genre)
    return genre, drums, f"{match['tags']}{match['number']}"


def _scan_irmas_test(root: Path) -> Scan:
    """IRMAS-TestingData-Part*/<inner>/<name>.wav + <name>.txt (one code per line); song = name without -N."""
    records, skips, ignored = [], [], []
    files = _walk(root)
    present = set(files)
    for relpath in files:
        stem, extension = os.path.splitext(relpath)
        if extension.lower() == LABEL_EXTENSION:
            if not any(stem + ext in present for ext in _case_variants(AUDIO_EXTENSIONS)):
                reason = f"label file without audio: no audio file {Path(stem).name}.wav next to it"
                skips.append(Skip(path=relpath, reason=reason))
            continue
        if not _is_audio(relpath):
            ignored.append(relpath)
            continue
        label = next((stem + ext for ext in (".txt", ".TXT") if stem + ext in present), None)
        if label is None:
            skips.append(Skip(path=relpath, reason=f"no label file {Path(stem).name}.txt next to the audio"))
            continue
        try:
            instruments = parse_instruments((root / label).read_text(encoding="utf-8", errors="replace"))
        except UnknownLabel as error:
            skips.append(Skip(path=relpath, reason=f"{error} in {Path(label).name}"))
            continue
        except OSError as error:
            skips.append(Skip(path=relpath, reason=f"unreadable label file {Path(label).name}: {error.strerror}"))
            continue
        if not instruments:
            skips.append(Skip(path=relpath, reason=f"no labels in {Path(label).name} (empty label file)"))
            continue
        name = Path(stem).name
        match = TEST_EXCERPT.match(name)
        song = match["song"] if match else name
        records.append(_record(root, relpath, "irmas-test", instruments=instruments, genre=None, drums=None, song=song))
    return Scan(records=records, skips=skips, ignored=ignored)


def _case_variants(extensions: frozenset[str]) -> list[str]:
    return [variant for ext in sorted(extensions) for variant in (ext, ext.upper())]


def _scan_folder(root: Path) -> Scan:
    """Any tree of audio files, unlabeled; each file is its own song."""
    records, ignored = [], []
    for relpath in _walk(root):
        if _is_audio(relpath):
            records.append(_record(root, relpath, "folder", instruments=(), genre=None, drums=None, song=relpath))
        else:
            ignored.append(relpath)
    return Scan(records=records, skips=[], ignored=ignored)


def _scan_csv(csv_path: Path) -> Scan:
    """A CSV with `path` (relative to the CSV's folder, or absolute) and optional `instruments`, `genre`, `song`."""
    root = csv_path.parent
    records, skips = [], []
    seen: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise UserError(f"{csv_path}: no 'path' column (found: {', '.join(columns) or 'nothing'}); "
                            "the first row must name the columns path[,instruments,genre,song]")
        for row_number, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            relpath = row.get("path", "")
            where = f"{csv_path.name} row {row_number}"
            if not relpath:
                skips.append(Skip(path=where, reason=f"empty path in {where}"))
                continue
            if relpath in seen:
                skips.append(Skip(path=relpath, reason=f"duplicate of {csv_path.name} row {seen[relpath]} ({where})"))
                continue
            seen[relpath] = row_number
            path = Path(relpath) if os.path.isabs(relpath) else root / relpath
            if not os.path.lexists(path):
                skips.append(Skip(path=relpath, reason=f"file not found ({where})"))
                continue
            try:
                instruments = parse_instruments(row.get("instruments", ""))
                genre = row.get("genre") or None
                genre_index(genre)
            except UnknownLabel as error:
                skips.append(Skip(path=relpath, reason=f"{error} ({where})"))
                continue
            records.append(
                Record(path=path, relpath=relpath, source="csv", instruments=instruments, genre=genre, drums=None,
                       song=row.get("song") or relpath, key=make_key(relpath))
            )
    return Scan(records=records, skips=skips, ignored=[])
