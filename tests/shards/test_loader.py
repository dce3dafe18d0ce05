"""The loader on real tar shards read by stock webdataset: batches, crops, mixing, views, rank splits, URLs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds

from core.errors import UserError
from shards import vocab
from shards.loader import (DataConfig, SampleCache, eval_samples, sample_count, shard_urls, train_batches,
                           validation_files, validation_mixtures)
from shards.audio import decode_flac
from shards.pack import PackOptions, pack

RATE = 16000


def _pack(source: str, input_path: Path, outdir: Path, **options) -> Path:
    options = PackOptions(source=source, **options)
    pack(input_path, outdir, options=options, workers=1, progress=False, print_fn=lambda *args, **kwargs: None)
    return outdir


def read_metadata(spec) -> dict[str, dict]:
    """{key: json} of every sample, read back by stock webdataset."""
    dataset = wds.WebDataset(shard_urls(spec), shardshuffle=False).decode()
    return {sample["__key__"]: sample["json"] for sample in dataset}


@pytest.fixture(scope="module")
def data(irmas, tmp_path_factory) -> tuple[Path, dict]:
    """Packed IRMAS-layout clips (1 s, stereo, 16 inputs in uneven shards of 6, 6 and 4) in `out/train`, and an
    unlabeled folder cut into 2 s segments (1 s at the end of each 7 s file) in `unlabeled/train`."""
    root = tmp_path_factory.mktemp("loader")
    irmas.train(root / "irmas", songs_per_class=1, excerpts=1, seconds=1.0)
    irmas.folder(root / "folder")
    outdir = _pack("irmas-train", root / "irmas", root / "out", channels=2, shard_size=6)
    _pack("folder", root / "folder", root / "unlabeled", segment_seconds=2.0)
    meta = read_metadata(outdir / "train") | read_metadata(root / "unlabeled" / "train")
    return outdir, meta


def _batches(spec, **kwargs) -> list[dict]:
    return list(train_batches(spec, **{"batch_size": 4, "shuffle_buffer": 8, **kwargs}))


def _both(outdir: Path) -> list[Path]:
    return [outdir / "train", outdir.parent / "unlabeled" / "train"]


def test_shard_urls_resolve_every_spec_form(data, tmp_path):
    outdir, _ = data
    train = [str(outdir / "train" / f"shard-00000{i}.tar") for i in range(3)]
    assert shard_urls(outdir) == shard_urls(outdir / "train") == train  # an OUTDIR holding one split is that split
    assert shard_urls(f"{outdir}/train/shard-{{000000..000002}}.tar") == train
    assert shard_urls([train[0], f"{outdir}/train/shard-00000[12].tar"]) == train
    assert shard_urls(f"pipe:cat {outdir}/train/shard-00000{{0,1}}.tar") == [f"pipe:cat {p}" for p in train[:2]]
    copy = tmp_path / "copy"
    shutil.copytree(outdir / "train", copy / "train")
    (copy / "train" / "shard-000003.tar.tmp").write_bytes(b"partial")  # what an interrupted pack leaves
    assert shard_urls(copy) == [str(copy / "train" / Path(url).name) for url in train]
    assert sample_count(outdir) == 16 and sample_count(copy) == 16  # from the manifest, and from the tar headers


@pytest.mark.parametrize(
    "spec, words",
    [
        ("missing", ["missing", "no such", "python -m shards pack"]),
        ("empty", ["empty", "no shards", "python -m shards pack"]),
        ("two-splits", ["several splits", "train", "val"]),
        ("nothing", ["no shards given", "python -m shards pack"]),
    ],
)
def test_bad_specs_are_one_line_user_errors(data, tmp_path, spec, words):
    outdir, _ = data
    (tmp_path / "empty").mkdir()
    shutil.copytree(outdir / "train", tmp_path / "two-splits" / "train")
    shutil.copytree(outdir / "train", tmp_path / "two-splits" / "val")
    arg = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "two-splits": tmp_path / "two-splits"}
    with pytest.raises(UserError) as error:
        train_batches(arg.get(spec, []), batch_size=2)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_a_stale_manifest_count_is_named(data, tmp_path):
    outdir, _ = data
    shutil.copytree(outdir, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shard-000000.tar: holds 6 samples, the manifest says 7"):
        _batches(tmp_path / "out", shuffle_buffer=1)


def test_a_truncated_shard_stops_or_is_skipped_as_the_recipe_says(data, tmp_path, capsys):
    outdir, _ = data
    shutil.copytree(outdir, tmp_path / "out")
    victim = tmp_path / "out" / "train" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        _batches(tmp_path / "out", shuffle_buffer=1)
    message = str(error.value)
    assert "\n" not in message and "shard-000001.tar: unreadable shard" in message and "shards verify" in message
    with pytest.raises(UserError, match="shard-000001.tar: unreadable shard"):
        list(eval_samples(tmp_path / "out" / "train"))
    batches = _batches(tmp_path / "out", shuffle_buffer=1, bad_shards="skip", batches_per_epoch=8)
    assert len(batches) == 8 and all(len(batch["key"]) == 4 for batch in batches)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "shard-000001.tar" in warnings[0] and "(1 bad shard(s) so far)" in warnings[0]
    for name in ("shard-000000.tar", "shard-000002.tar"):
        (tmp_path / "out" / "train" / name).write_bytes(b"not a tar")
    with pytest.raises(UserError, match="no readable shard left"):
        _batches(tmp_path / "out", shuffle_buffer=1, bad_shards="skip", batches_per_epoch=8)


def test_batches_have_contract_shapes_dtypes_and_targets(data):
    outdir, meta = data
    batches = _batches(_both(outdir), batch_size=3, clip_seconds=1.5)
    assert len(batches) == 12  # ceil((16 + 20) / 3)
    seen = set()
    for batch in batches:
        assert batch["audio"].shape == (3, 24000) and batch["audio"].dtype == torch.float32
        assert batch["targets"].shape == (3, 11) and batch["targets"].dtype == torch.float32
        assert batch["families"].shape == (3, 6) and batch["families"].dtype == torch.float32
        assert batch["genre"].dtype == torch.int64 and batch["labelled"].dtype == torch.bool
        for i, key in enumerate(batch["key"]):
            info = meta[key]
            seen.add(key)
            assert batch["targets"][i].tolist() == vocab.multi_hot(info["instruments"]).tolist()
            assert batch["families"][i].tolist() == vocab.family_multi_hot(info["instruments"]).tolist()
            assert batch["genre"][i].item() == vocab.genre_index(info["genre"])
            assert batch["labelled"][i].item() == (info["source"] != "folder")
            assert batch["song"][i] == info["song"]
    assert len(seen) >= 30 and {meta[key]["source"] for key in seen} == {"irmas-train", "folder"}


def test_crops_pad_and_resample_to_the_asked_length(data, tmp_path):
    outdir, meta = data
    for batch in _batches(_both(outdir), clip_seconds=1.5):
        assert batch["audio"].shape == (4, 24000)
        for i, key in enumerate(batch["key"]):
            silent = int((batch["audio"][i] == 0).sum())
            if meta[key]["duration"] < 1.5:  # zero-padded somewhere; the rest is the whole clip
                assert silent >= 24000 - meta[key]["num_samples"] - 1
            else:  # a crop of a longer clip is sound all the way through
                assert silent < 100
    slow = _pack("folder", outdir.parent / "folder", tmp_path / "slow", segment_seconds=2.0, sample_rate=8000)
    native = {sample["key"]: sample["audio"] for sample in eval_samples(outdir.parent / "unlabeled")}
    for batch in _batches(slow, clip_seconds=2.0, shuffle_buffer=1):
        assert batch["audio"].shape == (4, 32000)
        for i, key in enumerate(batch["key"]):  # the 8 kHz copy keeps its pitch when loaded at 16 kHz
            peak = np.argmax(np.abs(np.fft.rfft(batch["audio"][i].numpy()))) * 16000 / 32000
            reference = native[key].numpy()
            expected = np.argmax(np.abs(np.fft.rfft(reference))) * 16000 / len(reference)
            assert abs(peak - expected) <= 2.0


def test_mixing_unions_labels_and_respects_genre_and_labelled(data):
    outdir, meta = data
    for same_genre in (False, True):
        mixed = 0
        for epoch in range(3):
            mixing = dict(mix_max=4, mix_probability=1.0, same_genre_mix=same_genre, epoch=epoch)
            for batch in _batches(_both(outdir), **mixing):
                assert batch["audio"].abs().max() <= 0.99 + 1e-6
                for i, key in enumerate(batch["key"]):
                    parts = key.split("+")
                    assert 1 <= len(parts) <= 4 and len({meta[p]["song"] for p in parts}) == len(parts)
                    assert batch["song"][i] == "+".join(meta[p]["song"] for p in parts)
                    union = sorted({code for p in parts for code in meta[p]["instruments"]})
                    assert batch["targets"][i].tolist() == vocab.multi_hot(union).tolist()
                    assert batch["families"][i].tolist() == vocab.family_multi_hot(union).tolist()
                    assert len({meta[p]["source"] for p in parts}) == 1  # labelled clips only with labelled ones
                    genres = {meta[p]["genre"] for p in parts}
                    if same_genre and len(parts) > 1:
                        assert len(genres) == 1 and None not in genres
                    assert batch["genre"][i].item() == (vocab.genre_index(genres.pop()) if len(genres) == 1 else -1)
                    mixed += len(parts) > 1
        assert mixed > 20


def test_views_are_different_crops_of_one_clip(data):
    outdir, meta = data
    batch = _batches(outdir.parent / "unlabeled", views=3, clip_seconds=1.0)[0]
    assert batch["audio"].shape == (4, 3, 16000)
    long = [i for i, key in enumerate(batch["key"]) if meta[key]["duration"] > 1.0]
    assert long and all(not torch.equal(batch["audio"][i, 0], batch["audio"][i, 1]) for i in long)


def test_channel_views_are_the_channels_of_one_crop(data):
    """view_source=channels: view v is channel v of one crop (the stereo IRMAS clips); a mono clip gives copies."""
    outdir, meta = data
    stereo = {sample["__key__"]: decode_flac(sample["flac"])[0]
              for sample in wds.WebDataset(shard_urls(outdir / "train"), shardshuffle=False)}
    batches = _batches(_both(outdir), views=2, view_source="channels", clip_seconds=0.5)
    checked = 0
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            views = batch["audio"][i].numpy()
            if meta[key]["channels"] == 1:
                assert np.array_equal(views[0], views[1])
                continue
            audio = stereo[key]
            start = next(s for s in range(len(audio) - 8000 + 1) if np.array_equal(audio[s: s + 8000, 0], views[0]))
            assert np.array_equal(audio[start: start + 8000, 1], views[1]) and not np.array_equal(views[0], views[1])
            checked += 1
    assert checked >= 8
    with pytest.raises(UserError, match="view_source='frames': choose one of crops, channels, channel-crops"):
        _batches(outdir, views=2, view_source="frames")


def test_channel_crop_views_are_crops_of_their_own_channel_at_their_own_time(data):
    """view_source=channel-crops: view v is a random crop of channel v (paired renderings: other timbre and notes)."""
    outdir, meta = data
    stereo = {sample["__key__"]: decode_flac(sample["flac"])[0]
              for sample in wds.WebDataset(shard_urls(outdir / "train"), shardshuffle=False)}
    starts = []
    for batch in _batches(_both(outdir), views=2, view_source="channel-crops", clip_seconds=0.5):
        for i, key in enumerate(batch["key"]):
            if meta[key]["channels"] == 2:
                audio, views = stereo[key], batch["audio"][i].numpy()
                starts.append([next(s for s in range(len(audio) - 8000 + 1)
                                    if np.array_equal(audio[s: s + 8000, channel], views[channel]))
                               for channel in (0, 1)])
    assert len(starts) >= 8 and sum(first != second for first, second in starts) >= len(starts) // 2


def test_same_seed_epoch_rank_replays_identically(data):
    outdir, _ = data
    args = dict(mix_max=3, views=2, seed=3, epoch=1, rank=1, world_size=2)
    first, second = _batches(_both(outdir), **args), _batches(_both(outdir), **args)
    assert [b["key"] for b in first] == [b["key"] for b in second]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(first, second))
    other = _batches(_both(outdir), **{**args, "epoch": 2})
    assert [b["key"] for b in first] != [b["key"] for b in other]


def _same(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a["key"] == b["key"] and torch.equal(a["audio"], b["audio"]) and torch.equal(a["targets"], b["targets"])
        for a, b in zip(first, second))


def test_a_sample_cache_replays_every_epoch_bit_for_bit_without_reading_the_shards_again(data, tmp_path):
    outdir, _ = data
    shutil.copytree(outdir, tmp_path / "out")
    shutil.copytree(outdir.parent / "unlabeled", tmp_path / "unlabeled")
    spec = _both(tmp_path / "out")  # stereo 1 s clips (mono-mixed, padded) and 2 s segments (cropped)
    args = dict(clip_seconds=1.5, mix_max=3, mix_probability=0.7, views=2, rank=1, world_size=2)
    expected = [_batches(spec, epoch=epoch, **args) for epoch in range(3)]
    small = SampleCache(400_000 / 2**30)  # room for one shard of six 1 s stereo clips (int16: 384 KB)
    assert _same(_batches(spec, epoch=0, cache=small, **args), expected[0]) and len(small.shards) == 1
    assert small.too_large and not small.too_large & set(small.shards)  # the others are not decoded whole again
    assert _same(_batches(spec, epoch=1, cache=small, **args), expected[1])  # the others are read again
    cache = SampleCache(1.0)
    assert _same(_batches(spec, epoch=0, cache=cache, **args), expected[0])
    for epoch in (1, 2):  # the epochs deal other shards to this rank, so the cache grows until it holds them all
        assert _same(_batches(spec, epoch=epoch, cache=cache, **args), expected[epoch])
    assert sorted(cache.shards) == sorted(shard_urls(spec))
    assert all(sample["pcm"].dtype == np.int16 for samples in cache.shards.values() for sample in samples)
    for url in shard_urls(spec):
        Path(url).write_bytes(b"")  # the shards are gone; only the cache can answer now
    with pytest.raises(UserError, match="unreadable shard"):
        _batches(spec, epoch=1, **args)
    assert _same(_batches(spec, epoch=1, cache=cache, **args), expected[1])


def test_a_sample_cache_is_refused_with_workers_or_a_negative_size(data):
    outdir, _ = data
    with pytest.raises(UserError, match="num_workers=2 .*data.cache_gb=0"):
        train_batches(outdir, batch_size=4, num_workers=2, cache=SampleCache(1.0))
    with pytest.raises(UserError, match="data.cache_gb=-1"):
        DataConfig(train=str(outdir), cache_gb=-1).sample_cache()
    assert DataConfig(train=str(outdir)).sample_cache() is None


@pytest.mark.parametrize("shard_size", [6, 256], ids=["uneven-shards", "fewer-shards-than-ranks"])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_number_of_batches(data, tmp_path, shard_size, workers):
    outdir, meta = data
    spec = outdir / "train"
    if shard_size != 6:  # the same 16 clips in a single shard
        spec = _pack("irmas-train", outdir.parent / "irmas", tmp_path / "one", shard_size=shard_size)
        assert len(shard_urls(spec)) == 1
    counts, keys = [], []
    for rank in range(2):
        batches = list(  # no shuffle buffer, so that nothing lingers in it past the end of the epoch
            train_batches(spec, batch_size=3, rank=rank, world_size=2, num_workers=workers, shuffle_buffer=1)
        )
        counts.append(len(batches))
        keys.append([key for batch in batches for key in batch["key"]])
        assert all(len(batch["key"]) == 3 for batch in batches)
    assert counts == [3, 3]  # ceil(16 / (3 * 2)) on each rank
    assert set(keys[0]) | set(keys[1]) == set(read_metadata(spec))  # every clip is seen in the epoch,
    assert len(set(keys[0]) & set(keys[1])) <= 2  # twice only in the 2 slots beyond the 16 clips
    fixed = list(train_batches(spec, batch_size=3, rank=1, world_size=2, batches_per_epoch=7, num_workers=workers))
    assert len(fixed) == 7


def test_eval_yields_each_sample_once_across_ranks_full_length(data):
    outdir, meta = data
    seen = []
    for rank in range(2):
        samples = list(eval_samples(outdir / "train", rank=rank, world_size=2))
        assert len(samples) == 8
        for sample in samples:
            info = meta[sample["key"]]
            assert sample["audio"].shape == (info["num_samples"],) and sample["audio"].dtype == torch.float32
            assert sample["sample_rate"] == RATE and sample["instruments"] == info["instruments"]
            assert sample["targets"].tolist() == vocab.multi_hot(info["instruments"]).tolist()
            assert sample["genre"] == vocab.genre_index(info["genre"]) and sample["path"] == info["path"]
            seen.append(sample["key"])
    assert sorted(seen) == sorted(read_metadata(outdir / "train"))
    resampled = next(eval_samples(outdir, sample_rate=8000))
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


def test_validation_files_are_long_test_like_pieces_of_held_out_songs(irmas, tmp_path):
    irmas.train(tmp_path / "irmas", songs_per_class=2, excerpts=2, seconds=1.0)
    outdir = _pack("irmas-train", tmp_path / "irmas", tmp_path / "out")
    samples = list(eval_samples(outdir / "train", rank=0, world_size=1, sample_rate=RATE))
    songs: dict[str, list] = {}
    for sample in samples:
        songs.setdefault(sample["song"], []).append(sample)
    assert min(len(clips) for clips in songs.values()) >= 2  # files of up to 4.5 clips start songs again

    files = validation_files(samples, count=12, seed=3, sizes={3: 1.0}, seconds=(2.5, 4.5))
    assert len(files) == 12
    for file in files:
        assert 2.5 * RATE <= file["audio"].shape[-1] <= 4.5 * RATE and file["audio"].dtype == torch.float32
        assert len(file["instruments"]) == 3 and file["targets"].sum() == 3  # three different instruments ...
        assert file["targets"].numpy().tolist() == vocab.multi_hot(file["instruments"]).tolist()
        assert len(set(file["key"].split("+"))) == 3  # ... from three different songs
        assert float(file["audio"].abs().max()) > 0
    again = validation_files(samples, count=12, seed=3, sizes={3: 1.0}, seconds=(2.5, 4.5))
    assert all(torch.equal(a["audio"], b["audio"]) and a["key"] == b["key"] for a, b in zip(files, again))
    other = validation_files(samples, count=12, seed=4, sizes={3: 1.0}, seconds=(2.5, 4.5))
    assert [file["key"] for file in other] != [file["key"] for file in files]
    # without a count: one file per two labelled clips, one mixture per clip (the recipes' eval.files/mixtures: 0)
    assert len(validation_files(samples, seed=0)) == len(samples) // 2
    assert len(validation_mixtures(samples, seed=0)) == len(samples)

    # one instrument: the song's clips in turn (from its first again once they run out), cut to the file's length
    for file in validation_files(samples, count=6, seed=0, sizes={1: 1.0}, seconds=(2.5, 4.5)):
        clips = [clip["audio"] for clip in sorted(songs[file["key"]], key=lambda clip: clip["key"])]
        expected = torch.cat(clips * 3)[: file["audio"].shape[-1]]
        assert file["instruments"] == songs[file["key"]][0]["instruments"]
        torch.testing.assert_close(file["audio"], expected)
