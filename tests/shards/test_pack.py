"""pack: real shards that stock webdataset and tarfile read, every input accounted for, resumable, deterministic."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from core.errors import UserError, run_cli
from shards.__main__ import main
from shards.format import MANIFEST
from shards.pack import PackOptions, pack
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^[A-Za-z0-9_-]+$")
FIELDS = {"key", "instruments", "genre", "drums", "song", "path", "start", "duration", "sample_rate", "channels",
          "num_samples", "source"}


def quiet(*_args) -> None:
    pass


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_tar(path: Path) -> dict[str, dict]:
    """key -> {"json": dict, "audio": ndarray, "rate": int}, with nothing but tarfile and soundfile."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            data = tar.extractfile(member).read()
            entry = samples.setdefault(key, {})
            if extension == "json":
                entry["json"] = json.loads(data)
            else:
                assert extension == "flac", member.name
                entry["audio"], entry["rate"] = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples


def all_samples(outdir: Path) -> dict[str, dict]:
    samples = {}
    for path in sorted(outdir.glob("*/shard-*.tar")):
        samples.update({k: {**v, "split": path.parent.name} for k, v in read_tar(path).items()})
    return samples


@pytest.fixture(scope="module")
def train_tree(irmas, tmp_path_factory):
    return irmas.bad_inputs(irmas.train(tmp_path_factory.mktemp("irmas"), songs_per_class=3, excerpts=2),
                          layout="train")


@pytest.fixture(scope="module")
def packed(train_tree, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("packed") / "out"
    options = PackOptions(source="irmas-train", shard_size=16, val_fraction=0.25, seed=1)
    return pack(train_tree.root, outdir, options=options, workers=1, progress=False, print_fn=quiet), outdir


def test_every_input_is_packed_or_skipped_with_its_reason(train_tree, packed):
    manifest, outdir = packed
    assert manifest["inputs"] == train_tree.inputs
    assert manifest["packed"] + manifest["skipped"] == manifest["inputs"]
    assert manifest["packed"] == len(train_tree.expected)
    reasons = {s["path"]: s["reason"] for s in manifest["skips"]}
    assert set(reasons) == set(train_tree.skips)
    for path, word in train_tree.skips.items():
        assert word in reasons[path].lower(), (path, reasons[path])
        assert "\n" not in reasons[path]
    assert manifest["ignored"] == ["README.txt"]

    samples = all_samples(outdir)
    by_path = {s["json"]["path"]: s for s in samples.values()}
    assert set(by_path) == set(train_tree.expected)
    for path, labels in train_tree.expected.items():
        meta = by_path[path]["json"]
        assert set(meta) == FIELDS
        assert (meta["instruments"], meta["genre"], meta["drums"]) == (labels["instruments"], labels["genre"],
                                                                      labels["drums"])
        assert meta["source"] == "irmas-train" and meta["start"] == 0
        audio, rate = by_path[path]["audio"], by_path[path]["rate"]
        assert rate == meta["sample_rate"] == 16000 and audio.shape == (meta["num_samples"], 1)
        assert meta["duration"] == pytest.approx(0.5, abs=1e-3)  # 0.5 s at 44.1 kHz (the odd one at 22.05 kHz, 6 ch)
        assert np.abs(audio).max() > 0.01
    odd = next(p for p in train_tree.expected if "9100" in p)
    assert by_path[odd]["json"]["num_samples"] == 8000


def test_manifest_counts_checksums_and_splits(packed):
    manifest, outdir = packed
    assert manifest["options"] == {"source": "irmas-train", "sample_rate": 16000, "channels": 1, "shard_size": 16,
                                   "val_fraction": 0.25, "segment_seconds": None, "split": None, "seed": 1}
    assert set(manifest["splits"]) == {"train", "val"}
    samples = all_samples(outdir)
    assert manifest["samples"] == len(samples) == sum(s["samples"] for s in manifest["shards"])
    for shard in manifest["shards"]:
        path = outdir / shard["path"]
        assert shard["bytes"] == path.stat().st_size
        assert len(read_tar(path)) == shard["samples"] <= 16
    counts = {}
    for sample in samples.values():
        for code in sample["json"]["instruments"]:
            counts[code] = counts.get(code, 0) + 1
    assert manifest["instruments"] == dict(sorted(counts.items()))
    assert sum(manifest["genres"].values()) == manifest["samples"]
    assert manifest["duration"] == pytest.approx(sum(s["json"]["duration"] for s in samples.values()), abs=0.01)
    songs = {}
    for sample in samples.values():
        songs.setdefault(sample["json"]["song"], set()).add(sample["split"])
    assert all(len(splits) == 1 for splits in songs.values())  # no song in two splits
    assert not list(outdir.glob("*/*.tmp"))


def test_every_shard_mixes_instruments(packed):
    # Inputs come folder by folder (one instrument each); written in that order, a shard would hold one or two
    # instruments and a reader's shuffle buffer would feed batches of one or two classes.
    manifest, outdir = packed
    train = [shard for shard in manifest["shards"] if shard["split"] == "train"]
    assert len(train) >= 2
    for shard in train:
        codes = {code for sample in read_tar(outdir / shard["path"]).values() for code in sample["json"]["instruments"]}
        assert len(codes) >= min(5, shard["samples"] // 2), (shard["path"], codes)


def test_stock_webdataset_reads_the_shards(packed):
    manifest, outdir = packed
    urls = sorted(str(p) for p in (outdir / "train").glob("shard-*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()  # stock decoders: flac stays bytes, json -> dict
    seen = 0
    for sample in dataset:
        assert KEY.match(sample["__key__"]) and sample["json"]["key"] == sample["__key__"]
        audio, rate = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert rate == 16000 and audio.shape == (sample["json"]["num_samples"],)
        seen += 1
    assert seen == manifest["splits"]["train"]["samples"]


@pytest.mark.parametrize("workers, threaded", [(2, False), (3, True)])  # forked workers / forkserver workers
def test_same_output_for_any_worker_count(train_tree, packed, tmp_path, workers, threaded):
    manifest, outdir = packed
    release = threading.Event()
    if threaded:
        threading.Thread(target=release.wait, daemon=True).start()
    try:
        again = pack(train_tree.root, tmp_path / "n", options=PackOptions(**manifest["options"]), workers=workers,
                     progress=False, print_fn=quiet)
    finally:
        release.set()
    assert again == manifest
    for shard in manifest["shards"]:
        assert (tmp_path / "n" / shard["path"]).read_bytes() == (outdir / shard["path"]).read_bytes()


@pytest.mark.slow
def test_killed_pack_finishes_on_rerun_identical_to_a_clean_pack(irmas, tmp_path):
    tree = irmas.train(tmp_path / "in", songs_per_class=6, excerpts=2)
    args = ["pack", "irmas-train", str(tree.root), "--shard-size", "8", "--workers", "1", "--quiet"]
    clean = pack(tree.root, tmp_path / "clean", options=PackOptions(source="irmas-train", shard_size=8),
                 progress=False, print_fn=quiet)

    outdir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "shards", *args, str(outdir)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = outdir / ".pack-state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["splits"]["train"]["shards"]:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (outdir / MANIFEST).exists(), "the pack finished before it could be interrupted"
    done = sorted(outdir.glob("train/shard-*.tar"))
    assert 0 < len(done) < len(clean["shards"])
    # make it worse: a half-written temporary shard and a damaged complete one
    (outdir / "train" / f"shard-{len(done):06d}.tar.tmp").write_bytes(done[0].read_bytes()[:5000])
    with open(done[-1], "r+b") as handle:
        handle.truncate(3000)

    result = cli(*args, str(outdir))
    assert result.returncode == 0, result.stderr
    assert f"packed {tree.inputs} of {tree.inputs} inputs" in result.stdout
    assert f"resuming {outdir}: {len(done) - 1} complete shard(s) kept" in result.stdout
    assert json.loads((outdir / MANIFEST).read_text()) == clean
    for shard in clean["shards"]:
        assert (outdir / shard["path"]).read_bytes() == (tmp_path / "clean" / shard["path"]).read_bytes()
    assert not list(outdir.glob("train/*.tmp"))
    assert verify(outdir, print_fn=quiet) == 0


def test_rerun_of_a_finished_pack_changes_nothing_and_other_packs_are_refused(train_tree, packed, tmp_path):
    manifest, outdir = packed
    copy = tmp_path / "copy"
    shutil.copytree(outdir, copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("*/shard-*.tar")}
    assert pack(train_tree.root, copy, options=PackOptions(**manifest["options"]), progress=False,
                print_fn=quiet) == manifest
    assert {p: p.stat().st_mtime_ns for p in copy.glob("*/shard-*.tar")} == stamps
    with pytest.raises(UserError, match="different inputs or options"):
        pack(train_tree.root, copy, options=PackOptions(source="irmas-train", shard_size=8), print_fn=quiet)


def test_folder_segments_and_formats(irmas, tmp_path):
    tree = irmas.bad_inputs(irmas.folder(tmp_path / "in", seconds=7.0), layout="folder")
    manifest = pack(tree.root, tmp_path / "out",
                    options=PackOptions(source="folder", segment_seconds=3.0, sample_rate=22050, channels=2),
                    progress=False, print_fn=quiet)
    assert manifest["inputs"] == tree.inputs and manifest["packed"] == len(tree.expected)
    samples = all_samples(tmp_path / "out")
    per_file: dict[str, list[float]] = {}
    for sample in samples.values():
        meta = sample["json"]
        per_file.setdefault(meta["path"], []).append(meta["start"])
        assert meta["song"] == meta["path"] and meta["instruments"] == [] and meta["source"] == "folder"
        assert sample["rate"] == 22050 and sample["audio"].shape[1] == 2
        assert sample["audio"].shape[0] == meta["num_samples"]
    # 7 s -> segments at 0 s and 3 s; the 1 s remainder is shorter than half a segment
    assert {p: sorted(s) for p, s in per_file.items()} == {p: [0.0, 3.0] for p in tree.expected if "bad" not in p} | {
        p: [0.0] for p in tree.expected if "bad" in p}
    assert manifest["splits"]["train"]["unlabelled"] == manifest["samples"] == len(samples)


def test_cli_strict_summary_and_one_line_errors(irmas, tmp_path):
    tree = irmas.bad_inputs(irmas.test(tmp_path / "in", seconds=0.5, excerpts=1), layout="test")
    result = cli("pack", "irmas-test", str(tree.root), str(tmp_path / "out"), "--workers", "1", "--strict")
    assert result.returncode == 1
    assert f"packed {len(tree.expected)} of {tree.inputs} inputs" in result.stdout
    assert "Lonely label-1.txt: label file without audio" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "--strict" in result.stderr
    assert "MPEG" not in result.stderr and "Note:" not in result.stderr  # the mp3 decoder's chatter stays hidden
    assert set((tmp_path / "out").iterdir()) >= {tmp_path / "out" / "test", tmp_path / "out" / MANIFEST}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pack", "irmas", "IN", "OUT"], "irmas: unknown source"),
        (["pack", "folder", "IN", "OUT", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["pack", "folder", "IN", "OUT", "--shard-size", "0"], "argument --shard-size: 0 must be at least 1"),
        (["pack", "folder", "IN", "OUT", "--workers", "two"], "argument --workers: 'two' is not a number"),
        (["pack", "folder", "IN", "OUT", "--split", "a.b"], "--split 'a.b'"),
        (["pack", "folder", "EMPTY", "OUT"], "no audio files found"),
        (["pack", "irmas-train", "NOWHERE", "OUT"], "NOWHERE: input directory not found"),
        (["pack", "csv", "IN", "OUT"], "IN: CSV manifest not found"),
    ],
)
def test_cli_user_errors(argv, message, tmp_path, capsys):
    (tmp_path / "IN").mkdir()
    write = tmp_path / "IN" / "a.wav"
    sf.write(write, np.full((800, 1), 0.1, dtype=np.float32), 8000)
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("IN", "OUT", "EMPTY", "NOWHERE") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_outdir_that_is_a_file_is_a_user_error(train_tree, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the output folder"):
        pack(train_tree.root, tmp_path / "file" / "out", options=PackOptions(source="irmas-train"), print_fn=quiet)
