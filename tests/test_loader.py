"""The loader on real tar shards read by stock webdataset: batches, crops, mixing, views, rank splits, URLs."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from shards import vocab
from shards.errors import UserError
from shards.loader import eval_samples, sample_count, shard_urls, train_batches

RATE = 16000


def _flac(seconds: float, rate: int, frequency: float, channels: int = 1) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone] * channels, axis=1), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_split(directory: Path, shard_sizes: list[int], *, seconds=(1.0, 2.0, 4.0), rate=RATE, unlabeled=False):
    """Shards in the documented pack format; returns {key: metadata}."""
    directory.mkdir(parents=True, exist_ok=True)
    meta, n = {}, 0
    for index, size in enumerate(shard_sizes):
        with wds.TarWriter(str(directory / f"shard-{index:06d}.tar")) as writer:
            for _ in range(size):
                key = f"{directory.name}-{n:04d}"
                length = seconds[n % len(seconds)]
                info = {
                    "key": key,
                    "instruments": [] if unlabeled else sorted({vocab.INSTRUMENTS[n % 11], vocab.INSTRUMENTS[n % 3]}),
                    "genre": None if unlabeled else vocab.GENRES[n % 2],
                    "drums": None,
                    "song": f"{directory.name}-song{n // 2}",
                    "path": f"in/{key}.wav",
                    "start": 0.0,
                    "duration": length,
                    "sample_rate": rate,
                    "channels": 2,
                    "num_samples": round(length * rate),
                    "source": "folder" if unlabeled else "irmas-train",
                }
                writer.write({"__key__": key, "flac": _flac(length, rate, 200 + 37 * n, channels=2), "json": info})
                meta[key] = info
                n += 1
    return meta


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    """OUTDIR with a train split of three uneven shards (10, 3 and 1 samples) and an unlabeled split."""
    root = tmp_path_factory.mktemp("shards")
    meta = write_split(root / "out" / "train", [10, 3, 1])
    meta |= write_split(root / "out" / "unlabeled", [4], unlabeled=True)
    return root / "out", meta


def _batches(spec, **kwargs) -> list[dict]:
    return list(train_batches(spec, **{"batch_size": 4, "shuffle_buffer": 8, **kwargs}))


def test_shard_urls_resolve_every_spec_form(data, tmp_path):
    outdir, _ = data
    train = sorted(str(p) for p in (outdir / "train").glob("*.tar"))
    assert shard_urls(outdir / "train") == train
    assert shard_urls(f"{outdir}/train/shard-{{000000..000002}}.tar") == train
    assert shard_urls([train[0], f"{outdir}/train/shard-00000[12].tar"]) == train
    assert shard_urls(f"pipe:cat {outdir}/train/shard-00000{{0,1}}.tar") == [f"pipe:cat {p}" for p in train[:2]]
    only = tmp_path / "only"
    shutil.copytree(outdir / "unlabeled", only / "unlabeled")
    (only / "unlabeled" / ".shard-000001.tar.tmp").write_bytes(b"partial")  # an interrupted pack leaves this
    assert shard_urls(only) == [str(only / "unlabeled" / "shard-000000.tar")]
    assert sample_count(outdir / "train") == 14


@pytest.mark.parametrize(
    "spec, words",
    [
        ("missing", ["missing", "no such", "python -m shards pack"]),
        ("empty", ["empty", "no shards", "python -m shards pack"]),
        ("outdir", ["several splits", "train", "unlabeled"]),
        ("[]", ["no shards given", "python -m shards pack"]),
    ],
)
def test_bad_specs_are_one_line_user_errors(data, tmp_path, spec, words):
    outdir, _ = data
    (tmp_path / "empty").mkdir()
    arg = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "outdir": outdir, "[]": []}[spec]
    with pytest.raises(UserError) as error:
        train_batches(arg, batch_size=2)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_batches_have_contract_shapes_dtypes_and_targets(data):
    outdir, meta = data
    batches = _batches([outdir / "train", outdir / "unlabeled"], batch_size=3, clip_seconds=1.5)
    assert len(batches) == 6  # ceil(18 / 3)
    seen = Counter()
    for batch in batches:
        assert batch["audio"].shape == (3, 24000) and batch["audio"].dtype == torch.float32
        assert batch["targets"].shape == (3, 11) and batch["targets"].dtype == torch.float32
        assert batch["families"].shape == (3, 6) and batch["families"].dtype == torch.float32
        assert batch["genre"].dtype == torch.int64 and batch["labelled"].dtype == torch.bool
        for i, key in enumerate(batch["key"]):
            info = meta[key]
            seen[key] += 1
            assert batch["targets"][i].tolist() == vocab.multi_hot(info["instruments"]).tolist()
            assert batch["families"][i].tolist() == vocab.family_multi_hot(info["instruments"]).tolist()
            assert batch["genre"][i].item() == vocab.genre_index(info["genre"])
            assert batch["labelled"][i].item() == bool(info["instruments"])
            assert batch["song"][i] == info["song"]
    assert len(seen) >= 14  # most of the 18 clips in one epoch of 18 slots
    assert {False, True} == {meta[k]["source"] == "folder" for k in seen} and not any(meta[k]["instruments"] for k in seen if meta[k]["source"] == "folder")


def test_crops_pad_and_resample_to_the_asked_length(data, tmp_path):
    outdir, meta = data
    for batch in _batches(outdir / "train", clip_seconds=3.0):
        assert batch["audio"].shape == (4, 48000)
        for i, key in enumerate(batch["key"]):
            silent = int((batch["audio"][i] == 0).sum())
            if meta[key]["duration"] < 3:  # padded with zeros somewhere, the rest is the whole clip
                assert silent >= 48000 - meta[key]["num_samples"] - 1
            else:  # a crop of a longer clip is sound all the way through
                assert silent < 100
    write_split(tmp_path / "slow", [3], seconds=(2.0,), rate=8000)
    batch = _batches(tmp_path / "slow", batch_size=3, clip_seconds=1.0)[0]
    assert batch["audio"].shape == (3, 16000)
    for i, key in enumerate(batch["key"]):  # the 8 kHz tone keeps its pitch at 16 kHz
        spectrum = np.abs(np.fft.rfft(batch["audio"][i].numpy()))
        assert abs(np.argmax(spectrum) - (200 + 37 * int(key.split("-")[-1]))) <= 1


def test_mixing_unions_labels_and_respects_genre_and_labelled(data):
    outdir, meta = data
    spec = [outdir / "train", outdir / "unlabeled"]
    for same_genre in (False, True):
        mixed = 0
        for epoch in range(3):
            for batch in _batches(spec, mix_max=4, mix_probability=1.0, same_genre_mix=same_genre, epoch=epoch):
                assert batch["audio"].abs().max() <= 0.99 + 1e-6
                for i, key in enumerate(batch["key"]):
                    parts = key.split("+")
                    assert 1 <= len(parts) <= 4 and len({meta[p]["song"] for p in parts}) == len(parts)
                    union = sorted({code for p in parts for code in meta[p]["instruments"]})
                    assert batch["targets"][i].tolist() == vocab.multi_hot(union).tolist()
                    assert batch["families"][i].tolist() == vocab.family_multi_hot(union).tolist()
                    assert len({bool(meta[p]["instruments"]) for p in parts}) == 1  # labelled only with labelled
                    genres = {meta[p]["genre"] for p in parts}
                    if same_genre and len(parts) > 1:
                        assert len(genres) == 1 and None not in genres
                    assert batch["genre"][i].item() == (vocab.genre_index(genres.pop()) if len(genres) == 1 else -1)
                    mixed += len(parts) > 1
        assert mixed > 10


def test_views_are_different_crops_of_one_clip(data):
    outdir, meta = data
    batch = _batches(outdir / "train", views=3, clip_seconds=1.0)[0]
    assert batch["audio"].shape == (4, 3, 16000)
    long = [i for i, key in enumerate(batch["key"]) if meta[key]["duration"] > 1.0]
    assert long and all(not torch.equal(batch["audio"][i, 0], batch["audio"][i, 1]) for i in long)


def test_same_seed_epoch_rank_replays_identically(data):
    outdir, _ = data
    args = dict(mix_max=3, views=2, seed=3, epoch=1, rank=1, world_size=2)
    first, second = _batches(outdir / "train", **args), _batches(outdir / "train", **args)
    assert [b["key"] for b in first] == [b["key"] for b in second]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(first, second))
    other = _batches(outdir / "train", **{**args, "epoch": 2})
    assert [b["key"] for b in first] != [b["key"] for b in other]


@pytest.mark.parametrize("sizes", [[10, 3, 1], [5]], ids=["uneven-shards", "fewer-shards-than-ranks"])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_number_of_batches(tmp_path, sizes, workers):
    meta = write_split(tmp_path / "train", sizes)
    counts, keys = [], []
    for rank in range(2):
        batches = list(  # no shuffle buffer, so that nothing lingers in it past the end of the epoch
            train_batches(tmp_path / "train", batch_size=2, rank=rank, world_size=2, num_workers=workers, shuffle_buffer=1)
        )
        counts.append(len(batches))
        keys.append([key for batch in batches for key in batch["key"]])
        assert all(len(batch["key"]) == 2 for batch in batches)
    assert counts == [-(-sum(sizes) // 4)] * 2  # ceil(samples / (batch * world))
    fixed = list(train_batches(tmp_path / "train", batch_size=2, rank=1, world_size=2, batches_per_epoch=7))
    assert len(fixed) == 7
    assert set(keys[0]) | set(keys[1]) == set(meta)  # every clip is seen in the epoch,
    assert len(set(keys[0]) & set(keys[1])) <= 4 * counts[0] - sum(sizes)  # twice only in the slots beyond them


def test_eval_yields_each_sample_once_across_ranks_full_length(data):
    outdir, meta = data
    seen = []
    for rank in range(2):
        samples = list(eval_samples(outdir / "train", rank=rank, world_size=2))
        assert abs(len(samples) - 7) == 0
        for sample in samples:
            info = meta[sample["key"]]
            assert sample["audio"].shape == (info["num_samples"],) and sample["audio"].dtype == torch.float32
            assert sample["sample_rate"] == RATE and sample["instruments"] == info["instruments"]
            assert sample["targets"].tolist() == vocab.multi_hot(info["instruments"]).tolist()
            assert sample["genre"] == vocab.genre_index(info["genre"]) and sample["path"] == info["path"]
            seen.append(sample["key"])
    assert sorted(seen) == sorted(k for k in meta if k.startswith("train"))
    resampled = next(eval_samples(outdir / "train", sample_rate=8000))
    assert resampled["sample_rate"] == 8000 and len(resampled["audio"]) == meta[resampled["key"]]["num_samples"] // 2


def test_pipe_and_fsspec_urls_read_like_local_paths(data):
    outdir, _ = data
    local = _batches(outdir / "train", seed=5)
    piped = _batches(f"pipe:cat {outdir}/train/shard-{{000000..000002}}.tar", seed=5)
    assert [b["key"] for b in piped] == [b["key"] for b in local]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(local, piped))
    memory = fsspec.filesystem("memory")
    for path in sorted((outdir / "train").glob("*.tar")):
        memory.pipe(f"/bucket/out/train/{path.name}", path.read_bytes())
    assert shard_urls("memory://bucket/out") == [f"memory:///bucket/out/train/shard-00000{i}.tar" for i in range(3)]
    remote = _batches("memory://bucket/out/train/", seed=5)
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    keys = [s["key"] for s in eval_samples("memory://bucket/out/train")]
    assert keys == [s["key"] for s in eval_samples(outdir / "train")]
