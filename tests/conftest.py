"""Test-wide settings and the shared inputs, as fixtures.

Settings: nothing in the suite may reach the network; a broken install stops the run in one line.
Fixtures (session-scoped factories, usable from module-scoped fixtures too):
- `irmas`: IRMAS-layout trees of short real audio files with the awkward names of the real data set, instead of
  downloading IRMAS: `irmas.train(root, ...)` and `irmas.test(root, ...)` write the two layouts, `irmas.bad_inputs`
  adds the bad-input zoo (corrupt, empty, truncated, non-audio, unreadable, silent, NaN, unknown codes, orphan
  label/audio files, odd sample rates and channel counts), `irmas.folder` and `irmas.csv` write the unlabeled and CSV
  sources. Every tree knows which files must pack (`expected`, with their labels) and which must be skipped (`skips`,
  with a word the skip reason must contain).
- `tone`: (frames, channels) float32 harmonic tones.
- `run_module`: `python -m MODULE ARGS...` as a user runs it (repository root, offline), output captured.
- `write_shard`: one shard in the pack format (<key>.flac + <key>.json, `shards.format.SampleMeta`), written with
  stock webdataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from core.errors import environment_problem
from shards.vocab import DRUMS, GENRES, INSTRUMENTS

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = environment_problem()
    if problem:
        pytest.exit(problem, returncode=2)


TRAIN_DIR = "IRMAS-TrainingData"
TEST_PARTS = {  # part folder -> inner folder (the real data set names them inconsistently)
    "IRMAS-TestingData-Part1": "Part1",
    "IRMAS-TestingData-Part2": "IRTestingData-Part2",
    "IRMAS-TestingData-Part3": "Part 3 & more",
}

# Test excerpt names with dots, quotes, commas, ampersands and spaces: (song, labels).
TEST_SONGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("02 - Blue Bossa", (INSTRUMENTS[7], INSTRUMENTS[6])),
    ("Mr. Brightside (feat. J.D.)", (INSTRUMENTS[4], INSTRUMENTS[10])),
    ("Don't Stop Me Now", (INSTRUMENTS[6], INSTRUMENTS[10])),
    ('"Heroes" (live)', (INSTRUMENTS[4],)),
    ("Simon & Garfunkel, The Boxer", (INSTRUMENTS[3], INSTRUMENTS[10])),
    ("01.  Take Five ", (INSTRUMENTS[7], INSTRUMENTS[6], INSTRUMENTS[8])),
    ("Bach - Suite No. 1, BWV 1007", (INSTRUMENTS[0],)),
    ("Vivaldi - L'estro armonico", (INSTRUMENTS[9], INSTRUMENTS[0])),
)


@dataclass
class Tree:
    """A generated input tree: pass `root` as INPUT; `expected` must pack, `skips` must be skipped."""

    root: Path
    expected: dict[str, dict] = field(default_factory=dict)  # relpath -> {"instruments", "genre", "drums", "song"}
    skips: dict[str, str] = field(default_factory=dict)  # relpath -> word the skip reason contains (lowercase)

    @property
    def inputs(self) -> int:
        return len(self.expected) + len(self.skips)


def tone(
    *, seconds: float = 0.5, sample_rate: int = 44100, channels: int = 2, frequency: float = 440.0, seed: int = 0
) -> np.ndarray:
    """(frames, channels) float32: a harmonic tone plus a little noise, different per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    columns = []
    for c in range(channels):
        wave = sum(np.sin(2 * np.pi * frequency * (h + 1) * t + c) / (h + 1) for h in range(4))
        columns.append(0.25 * wave + 0.01 * rng.standard_normal(t.size))
    return np.stack(columns, axis=1).astype(np.float32)


def write_tone(path: Path, *, subtype: str | None = "PCM_16", format: str | None = None, **kwargs) -> Path:
    """Write a `tone(**kwargs)` to `path` (format from the extension unless given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_rate = kwargs.get("sample_rate", 44100)
    sf.write(path, tone(**kwargs), sample_rate, subtype=subtype, format=format)
    return path


def make_irmas_train(
    root: Path, *, songs_per_class: int = 2, excerpts: int = 2, seconds: float = 0.5, sample_rate: int = 44100
) -> Tree:
    """`root/IRMAS-TrainingData/<code>/[ins][drums?][genre]NNNN__K.wav`, with the `008__` prefix variant.

    Each class gets `songs_per_class` songs of `excerpts` excerpts; genres and drum tags rotate,
    and the real awkward names (`[cel][nod][cla]0058__1.wav`, `008__[cel][nod][cla]0058__1.wav`,
    `[cla][cla]0189__2.wav`) are always present.
    """
    base = root / TRAIN_DIR
    tree = Tree(root=base)
    counter = 0
    for i, code in enumerate(INSTRUMENTS):
        for s in range(songs_per_class):
            genre = GENRES[(i + s) % len(GENRES)]
            drums = (DRUMS[0], DRUMS[1], None)[(i + s) % 3]
            number = 1000 + 10 * i + s
            prefix = "008__" if s == 1 else ""
            tags = f"[{code}]" + (f"[{drums}]" if drums else "") + f"[{genre}]"
            for k in range(1, excerpts + 1):
                name = f"{prefix}{tags}{number:04d}__{k}.wav"
                counter += 1
                write_tone(
                    base / code / name,
                    seconds=seconds,
                    sample_rate=sample_rate,
                    frequency=110.0 * (1 + i) + 7 * s,
                    seed=counter,
                )
                tree.expected[f"{code}/{name}"] = {
                    "instruments": [code], "genre": genre, "drums": drums, "song": f"{code}/{tags}{number:04d}"
                }
    real = (  # (folder, name, drums, genre, song) with the real data set's names
        (INSTRUMENTS[0], "[cel][nod][cla]0058__1.wav", DRUMS[1], GENRES[1], "[cel][nod][cla]0058"),
        (INSTRUMENTS[0], "[cel][nod][cla]0058__2.wav", DRUMS[1], GENRES[1], "[cel][nod][cla]0058"),
        (INSTRUMENTS[0], "008__[cel][nod][cla]0058__1.wav", DRUMS[1], GENRES[1], "[cel][nod][cla]0058"),
        (INSTRUMENTS[1], "[cla][cla]0189__2.wav", None, GENRES[1], "[cla][cla]0189"),
        (INSTRUMENTS[1], "[cla][cla]0189__3.wav", None, GENRES[1], "[cla][cla]0189"),
    )
    for code, name, drums, genre, song in real:
        counter += 1
        write_tone(base / code / name, seconds=seconds, sample_rate=sample_rate, frequency=196.0, seed=counter)
        tree.expected[f"{code}/{name}"] = {
            "instruments": [code], "genre": genre, "drums": drums, "song": f"{code}/{song}"
        }
    (base / "README.txt").write_text("IRMAS training data (synthetic test fixture)\n")
    return tree


def make_irmas_test(root: Path, *, seconds: float = 1.0, sample_rate: int = 44100, excerpts: int = 2) -> Tree:
    """`root/IRMAS-TestingData-Part{1,2,3}/<inner>/<song>-<N>.wav` + `.txt` (labels with trailing tabs/spaces)."""
    tree = Tree(root=root)
    parts = list(TEST_PARTS.items())
    for i, (song, labels) in enumerate(TEST_SONGS):
        part, inner = parts[i % len(parts)]
        for n in range(1, excerpts + 1):
            stem = f"{song}-{n}"
            folder = root / part / inner
            write_tone(
                folder / f"{stem}.wav", seconds=seconds, sample_rate=sample_rate, frequency=150.0 + 40 * i, seed=100 + i
            )
            endings = ("\t\n", "  \n", " \t \r\n")
            text = "".join(code + endings[j % len(endings)] for j, code in enumerate(labels))
            (folder / f"{stem}.txt").write_text(text, newline="")
            tree.expected[f"{part}/{inner}/{stem}.wav"] = {
                "instruments": sorted(labels), "genre": None, "drums": None, "song": song
            }
    return tree


def add_bad_inputs(tree: Tree, *, layout: str, seconds: float = 0.5) -> Tree:
    """Add the bad-input zoo to `tree` in place. `layout` is "train", "test" or "folder"."""
    if layout == "train":
        code, genre = INSTRUMENTS[2], GENRES[2]
        folder = tree.root / code
        names = iter(f"[{code}][{genre}]{9000 + n}__1.wav" for n in range(100))
    elif layout == "test":
        part, inner = next(iter(TEST_PARTS.items()))
        folder = tree.root / part / inner
        names = iter(f"Bad input {n}-1.wav" for n in range(100))
    elif layout == "folder":
        folder = tree.root / "bad"
        names = iter(f"bad {n}.wav" for n in range(100))
    else:
        raise ValueError(layout)
    folder.mkdir(parents=True, exist_ok=True)

    def bad(word: str, label: bool = True, suffix: str = ".wav") -> Path:
        path = (folder / next(names)).with_suffix(suffix)
        tree.skips[path.relative_to(tree.root).as_posix()] = word
        if layout == "test" and label:
            path.with_suffix(".txt").write_text(INSTRUMENTS[6] + "\n")
        return path

    good = tone(seconds=seconds, sample_rate=44100, channels=2)
    wav = folder / "_reference.wav"
    sf.write(wav, good, 44100, subtype="PCM_16")
    whole = wav.read_bytes()
    wav.unlink()

    bad("empty").write_bytes(b"")
    bad("corrupt").write_bytes(whole[:12] + np.random.default_rng(1).bytes(2000))
    bad("truncated").write_bytes(whole[: len(whole) // 2])
    bad("not decodable audio").write_text("<html><body>This is not a wav file.</body></html>\n" * 20)
    bad("not decodable audio", suffix=".mp3").write_bytes(np.random.default_rng(2).bytes(3000))
    os.symlink(folder / "does-not-exist.wav", bad("unreadable"))
    sf.write(bad("silent"), np.zeros_like(good), 44100, subtype="PCM_16")
    with_nan = good.copy()
    with_nan[100, 0] = np.nan
    sf.write(bad("nan"), with_nan, 44100, subtype="FLOAT")
    sf.write(bad("no audio samples"), good[:0], 44100, subtype="PCM_16")

    # odd sample rate and channel count: must be resampled and mixed, not skipped
    odd = folder / (next(names) if layout != "train" else f"[{code}][{genre}]9100__1.wav")
    sf.write(odd, tone(seconds=seconds, sample_rate=22050, channels=6), 22050, subtype="PCM_24")
    if layout == "test":
        odd.with_suffix(".txt").write_text(f"{INSTRUMENTS[6]} \t\n")
    tree.expected[odd.relative_to(tree.root).as_posix()] = {
        "instruments": [INSTRUMENTS[6]] if layout == "test" else ([code] if layout == "train" else []),
        "genre": genre if layout == "train" else None,
        "drums": None,
        "song": None,  # not checked
    }

    if layout == "train":
        unknown = tree.root / "xyz" / f"[xyz][{genre}]0001__1.wav"
        write_tone(unknown, seconds=seconds)
        tree.skips[unknown.relative_to(tree.root).as_posix()] = "unknown instrument"
        unknown_genre = folder / f"[{code}][xyz_abc]0002__1.wav"
        write_tone(unknown_genre, seconds=seconds)
        tree.skips[unknown_genre.relative_to(tree.root).as_posix()] = "unknown genre"
    if layout == "test":
        unknown = bad("unknown instrument", label=False)
        write_tone(unknown, seconds=seconds)
        unknown.with_suffix(".txt").write_text(f"{INSTRUMENTS[6]}\nxyz\n")
        orphan_wav = bad("no label file", label=False)
        write_tone(orphan_wav, seconds=seconds)
        orphan_txt = folder / "Lonely label-1.txt"
        orphan_txt.write_text(INSTRUMENTS[6] + "\n")
        tree.skips[orphan_txt.relative_to(tree.root).as_posix()] = "no audio file"
        empty_label = bad("no labels", label=False)
        write_tone(empty_label, seconds=seconds)
        empty_label.with_suffix(".txt").write_text(" \n\t\n")
    return tree


def make_folder(root: Path, *, seconds: float = 7.0) -> Tree:
    """An unlabeled collection: nested folders of wav/flac/ogg/mp3 at mixed rates, plus non-audio files."""
    tree = Tree(root=root)
    files = (
        ("album one/01 intro.wav", 22050, 1, "PCM_16", None),
        ("album one/02. the song, part 2.flac", 44100, 2, "PCM_16", None),
        ("album two/nested/track.ogg", 32000, 2, "VORBIS", None),
        ("album two/track three.mp3", 44100, 2, "MPEG_LAYER_III", "MP3"),
        ("loose.wav", 48000, 2, "PCM_24", None),
    )
    for i, (relpath, rate, channels, subtype, fmt) in enumerate(files):
        write_tone(
            root / relpath, seconds=seconds, sample_rate=rate, channels=channels, subtype=subtype, format=fmt,
            frequency=220.0 + 30 * i, seed=i,
        )
        tree.expected[relpath] = {"instruments": [], "genre": None, "drums": None, "song": relpath}
    (root / "album one" / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "album one" / "notes.txt").write_text("liner notes\n")
    return tree


def make_csv(root: Path, *, seconds: float = 0.5) -> tuple[Path, Tree]:
    """`root/clips.csv` (path, instruments, genre, song) over `root/audio/`; returns (csv path, tree)."""
    tree = Tree(root=root)
    rows = ["path,instruments,genre,song"]
    for i, code in enumerate(INSTRUMENTS[:6]):
        relpath = f"audio/clip {i}.wav"
        write_tone(root / relpath, seconds=seconds, frequency=200.0 + 50 * i, seed=i)
        labels = [code, INSTRUMENTS[(i + 3) % len(INSTRUMENTS)]]
        genre = GENRES[i % len(GENRES)]
        rows.append(f'{relpath},"{" ".join(labels)}",{genre},song{i // 2}')
        tree.expected[relpath] = {"instruments": sorted(labels), "genre": genre, "drums": None, "song": f"song{i // 2}"}
    rows.append(f"audio/clip 6.wav,{INSTRUMENTS[0]};{INSTRUMENTS[1]},,")  # ';' is not a separator -> unknown code
    write_tone(root / "audio/clip 6.wav", seconds=seconds)
    tree.skips["audio/clip 6.wav"] = "unknown instrument"
    rows.append(f"audio/missing.wav,{INSTRUMENTS[0]},,")
    tree.skips["audio/missing.wav"] = "not found"
    csv_path = root / "clips.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path, tree


def write_shard(directory: Path, samples: Sequence[dict], *, source: str = "irmas-train") -> Path:
    """`directory`/shard-000000.tar holding `samples`: dicts of key, audio ((frames, channels) or (frames,) float32),
    sample_rate and optionally instruments, genre, drums, song; FLAC-encoded as pack does."""
    import webdataset as wds  # here, not at the top: a broken torch install must reach pytest_sessionstart's check

    from shards.audio import encode_flac
    from shards.format import SHARD_NAME, SampleMeta

    directory.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(directory / SHARD_NAME.format(0))) as writer:
        for sample in samples:
            audio = sample["audio"] if sample["audio"].ndim == 2 else sample["audio"][:, None]
            rate, key = sample["sample_rate"], sample["key"]
            meta = SampleMeta(key=key, instruments=sorted(sample.get("instruments", ())), genre=sample.get("genre"),
                              drums=sample.get("drums"), song=sample.get("song", key), path=f"{key}.wav", start=0.0,
                              duration=len(audio) / rate, sample_rate=rate, channels=audio.shape[1],
                              num_samples=len(audio), source=source)
            writer.write({"__key__": key, "flac": encode_flac(audio, rate), "json": json.dumps(meta).encode()})
    return directory


@pytest.fixture(scope="session")
def irmas() -> SimpleNamespace:
    return SimpleNamespace(train=make_irmas_train, test=make_irmas_test, bad_inputs=add_bad_inputs, folder=make_folder,
                           csv=make_csv, TRAIN_DIR=TRAIN_DIR, TEST_PARTS=TEST_PARTS)


@pytest.fixture(name="tone", scope="session")
def tone_fixture():
    return tone


@pytest.fixture(name="write_shard", scope="session")
def write_shard_fixture():
    return write_shard


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
               ) -> subprocess.CompletedProcess:
    """`python -m module args...` in the repository root, offline, with `env` on top of this environment."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                   "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(name="run_module", scope="session")
def run_module_fixture():
    return run_module
