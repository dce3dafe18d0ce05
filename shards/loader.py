"""Shards -> training batches and evaluation samples, with the same numbers of batches on every rank.

`train_batches` streams WebDataset shards (a split directory, an OUTDIR holding one split, local paths or
brace patterns, `pipe:` commands and fsspec URLs such as `s3://...`) through an explicit node splitter and
worker splitter, a seeded shuffle buffer, FLAC decoding with soundfile, random crops (or zero padding) to a
fixed length, optional on-the-fly polyphonic mixing and contrastive views, and collates fixed-size batches.

Why the epoch plan looks the way it does: under DDP every rank must run the same number of steps, or the
rank that runs out first leaves the others waiting in an all-reduce forever. So every rank reads an endless,
deterministic sample sequence -- seeded shard permutations one after another, identical everywhere -- that
is dealt out in runs of ceil(samples / world_size): one run to each rank in turn (the node splitter), and
each rank's own samples again to its DataLoader workers (the worker splitter). A rank therefore opens only
the shards that hold its runs (whole shards when shards outnumber ranks, single samples of a shared shard
when they do not), sees about a 1/world_size share of the data per epoch whatever the shard sizes, never
runs dry, and the stream is cut to exactly `batches_per_epoch` batches. Everything random after the split
is seeded by (seed, epoch, rank, worker), so an epoch replays batch for batch (the trainer resumes mid-epoch
by re-creating the epoch and skipping the batches it already consumed).

`eval_samples` yields every sample exactly once across ranks, full length, in a fixed order.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

import braceexpand
import fsspec
import numpy as np
import soundfile
import torch
import webdataset as wds
from einops import rearrange

from core.errors import UserError
from shards import vocab
from shards.audio import to_mono
from shards.format import MANIFEST, SAMPLE_FILES, Batch, SampleMeta

PACK_HINT = "write shards with `python -m shards pack SOURCE INPUT OUTDIR` and pass OUTDIR/<split>"
VERIFY_HINT = "check the pack with `python -m shards verify OUTDIR` and re-pack what it names"
BadShards = Literal["stop", "skip"]  # what training does with a shard that does not read
BAD_SHARD_POLICIES = get_args(BadShards)
ViewSource = Literal["crops", "channels", "channel-crops"]  # where the views of a clip come from (see _crops)
VIEW_SOURCES = get_args(ViewSource)
MIX_GAIN_DB = (-6.0, 0.0)  # random gain of each clip in a mixture, after matching loudness to the first clip
MIX_POOL = 32  # recent clips that mixing partners are drawn from
PEAK = 0.99  # mixtures louder than this are scaled down, never clipped


# ----------------------------------------------------------------------------------------------------
# Where the shards are


def shard_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into an ordered list of URLs that webdataset can open.

    Accepts a split directory (`OUTDIR/train`), an OUTDIR that holds a single split, a `.tar` path, a brace
    pattern (`shards/shard-{000000..000009}.tar`) or glob, a `pipe:` command, an fsspec URL (`s3://bucket/train/`),
    or a list of any of these.
    """
    specs = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    if not specs:
        raise UserError(f"no shards given; {PACK_HINT}")
    urls = [url for item in specs for url in _expand(item)]
    if not urls:
        raise UserError(f"{' '.join(specs)}: no shards found; {PACK_HINT}")
    return urls


def _expand(spec: str) -> list[str]:
    if not spec.strip():
        raise UserError(f"empty shard path; {PACK_HINT}")
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    urls = []
    for item in braceexpand.braceexpand(spec):
        fs, path = fsspec.core.url_to_fs(item)
        local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        paths = _resolve(fs, path, shown=item)
        urls.extend(paths if local else [fs.unstrip_protocol(p) for p in paths])
    return urls


def _resolve(fs: fsspec.AbstractFileSystem, path: str, *, shown: str) -> list[str]:
    """The shard files that one path stands for: a directory's shards, a glob's matches, or the file itself."""
    if glob.has_magic(path):
        found = sorted(p for p in fs.glob(path) if _is_shard(p))
        if not found:
            raise UserError(f"{shown}: matches no shard (*.tar); {PACK_HINT}")
        return found
    if fs.isdir(path):
        direct = sorted(p for p in fs.glob(f"{path.rstrip('/')}/*.tar") if _is_shard(p))
        if direct:
            return direct
        splits: dict[str, list[str]] = {}
        for p in sorted(fs.glob(f"{path.rstrip('/')}/*/*.tar")):
            if _is_shard(p):
                splits.setdefault(p.rsplit("/", 2)[-2], []).append(p)
        if len(splits) == 1:
            return next(iter(splits.values()))
        if splits:
            names = ", ".join(sorted(splits))
            first = f"{shown.rstrip('/')}/{'train' if 'train' in splits else sorted(splits)[0]}"
            raise UserError(f"{shown}: holds several splits ({names}); pass one split directory, e.g. {first}")
        raise UserError(f"{shown}: no shards (*.tar) in this directory; {PACK_HINT}")
    if fs.exists(path):
        return [path]
    raise UserError(f"{shown}: no such shard file or directory; {PACK_HINT}")


def is_shard_spec(name: str | os.PathLike) -> bool:
    """Shards rather than audio: a .tar file, or a folder holding .tar files (at any depth)."""
    path = Path(name)
    return path.suffix == ".tar" or (path.is_dir() and any(path.rglob("*.tar")))


def _is_shard(path: str) -> bool:
    """A finished shard: pack writes `shard-NNNNNN.tar.tmp` and renames it when the shard is complete."""
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".tar") and not name.startswith(".")


def _open(url: str) -> Any:
    """A binary stream for a shard: local paths and `pipe:` through webdataset's gopen, the rest through fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe") or len(scheme) == 1:
        return wds.gopen(url)
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as error:
        raise UserError(f"{url}: {error}") from None


def _tar_samples(url: str) -> Iterator[dict]:
    """The raw samples ({'__key__', 'flac', 'json'}) of one shard, read by webdataset's tar reader."""
    stream = _open(url)
    try:
        files = wds.tariterators.tar_file_expander([dict(url=url, stream=stream)])
        yield from wds.tariterators.group_by_keys(files)
    except (tarfile.TarError, EOFError, OSError) as error:
        cause = " ".join(str(error.args[0] if error.args else type(error).__name__).split())
        cause = re.sub(r"\s*@\s*<[^>]*>", "", cause)  # webdataset appends the stream's repr
        raise UserError(f"{url}: unreadable shard ({cause}); {VERIFY_HINT}") from None
    finally:
        stream.close()


def sample_count(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> int:
    """Number of samples in the shards of `spec` (from the pack manifest where there is one)."""
    return sum(_shard_counts(shard_urls(spec)))


def _shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard: the manifest written by pack when it lists the shard, else a scan of the tar headers."""
    known = _manifest_counts(urls)
    return [known[url] if url in known else _scan_count(url) for url in urls]


def _manifest_counts(urls: list[str]) -> dict[str, int]:
    """Per-shard counts from `OUTDIR/manifest.json` next to each split directory, keyed like `urls`."""
    counts: dict[str, int] = {}
    for outdir in {url.rsplit("/", 2)[0] for url in urls if url.count("/") >= 2 and not url.startswith("pipe:")}:
        try:
            with fsspec.open(f"{outdir}/{MANIFEST}", "rt") as stream:
                shards = json.load(stream).get("shards", [])
        except (OSError, ValueError, ImportError, AttributeError):
            continue
        for shard in shards:  # {"path": "train/shard-000000.tar", "samples": n, ...}
            if isinstance(shard, dict) and "path" in shard and "samples" in shard:
                counts[f"{outdir}/{shard['path']}"] = int(shard["samples"])
    return counts


def _scan_count(url: str) -> int:
    """Count samples by reading only the tar headers (a local file is seeked over, a stream read through)."""
    keys = set()
    stream = _open(url)
    try:
        seekable = getattr(stream, "seekable", lambda: False)()
        with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
            for member in tar:
                key, _ = wds.tariterators.base_plus_ext(member.name)
                if member.isreg() and key is not None:
                    keys.add(key)
    except tarfile.TarError as error:
        raise UserError(f"{url}: not a readable shard ({error}); run `python -m shards verify OUTDIR`") from None
    finally:
        stream.close()
    return len(keys)


# ----------------------------------------------------------------------------------------------------
# Who reads what


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, else from torch.distributed when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = rank if rank is not None else (torch.distributed.get_rank() if ready else 0)
        world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if ready else 1)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
    return rank, world_size


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader process running this code; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class _Plan:
    """One rank's epoch: the shards and their sizes, who this rank is, and how many batches it makes."""

    urls: tuple[str, ...]  # shards in a fixed order
    counts: tuple[int, ...]  # samples in each
    seed: int
    epoch: int
    rank: int
    world_size: int
    batches: int  # this rank's batches in the epoch, over all its workers

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def chunk(self) -> int:
        """Run of consecutive samples dealt to one rank at a time: one rank's share of an epoch."""
        return math.ceil(self.samples / self.world_size)

    def rng(self, stage: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{_worker()[0]}:{stage}")


def _endless_shards(plan: _Plan) -> Iterator[dict]:
    """Seeded shard permutations one after another, each shard with the index of its first sample in this endless
    sample sequence; identical on every rank and worker, so all of them agree on who reads what."""
    start = 0
    for repeat in count():
        order = list(range(len(plan.urls)))
        random.Random(f"{plan.seed}:{plan.epoch}:{repeat}").shuffle(order)
        for i in order:
            yield dict(url=plan.urls[i], start=start, count=plan.counts[i])
            start += plan.counts[i]


def _split_by_rank(src: Iterator[dict], *, plan: _Plan) -> Iterator[dict]:
    """Node splitter: runs of `chunk` samples of the endless sequence go to ranks in turn; a rank keeps the shards
    holding any of its samples (and which ones). Every rank gets an endless stream, whole shards where shards
    are larger than a rank's share, single samples where there are fewer samples than ranks."""
    for shard in src:
        indices = range(shard["start"], shard["start"] + shard["count"])
        picks = [g for g in indices if (g // plan.chunk) % plan.world_size == plan.rank]
        if picks:
            yield dict(shard, picks=picks)


def _split_by_worker(src: Iterator[dict], *, plan: _Plan) -> Iterator[dict]:
    """Worker splitter: each worker owns a contiguous part of every `period` samples of the rank's own sequence,
    sized by its share of the batches, so the workers together consume the rank's samples in order."""
    worker, workers = _worker()
    period = max(plan.chunk, plan.batches)  # >= batches: every worker with batches to make owns some samples
    before = sum(_batch_quota(plan.batches, w, workers) for w in range(worker))
    low = period * before // plan.batches
    high = period * (before + _batch_quota(plan.batches, worker, workers)) // plan.batches
    for shard in src:
        picks = [g for g in shard["picks"] if low <= _local(g, plan.chunk, plan.world_size) % period < high]
        if picks:
            yield dict(shard, picks=picks)


def _batch_quota(batches: int, worker: int, workers: int) -> int:
    """Batches that `worker` makes: the DataLoader takes one from each worker in turn, so the total is exact."""
    return batches // workers + (worker < batches % workers)


def _local(index: int, run: int, readers: int) -> int:
    """Position of global sample `index` in its owner's own sequence."""
    return (index // (run * readers)) * run + index % run


def _read(src: Iterator[dict], *, plan: _Plan, bad_shards: str, cache: SampleCache | None) -> Iterator[dict]:
    """The picked samples of each shard, checking that the shard holds as many samples as it was counted with.

    A shard that does not read (truncated, corrupt, short of samples) stops the run with `bad_shards="stop"`;
    with "skip" it is left out from then on, with a warning and a running count on stderr. With a `cache`, a shard
    already in it is not read again, and a shard read while the cache has room goes into it, decoded.
    """
    bad: set[str] = set()
    skipped_in_a_row = 0
    for shard in src:
        if shard["url"] in bad:
            skipped_in_a_row += 1
            if skipped_in_a_row > len(plan.urls):
                raise UserError(f"{plan.urls[0]}: no readable shard left for this reader ({len(bad)} skipped); "
                                f"{VERIFY_HINT}")
            continue
        cached = cache.shards.get(shard["url"]) if cache is not None else None
        if cached is not None:
            skipped_in_a_row = 0
            yield from (cached[index - shard["start"]] for index in shard["picks"])
            continue
        picks, seen, kept = set(shard["picks"]), 0, []
        keep = cache is not None and cache.wants(shard["url"])
        try:
            for sample in _tar_samples(shard["url"]):
                if keep:
                    sample = _decoded(sample)
                    kept.append(sample)
                if shard["start"] + seen in picks:
                    skipped_in_a_row = 0
                    yield sample
                seen += 1
            if seen != shard["count"]:
                raise UserError(f"{shard['url']}: holds {seen} samples, the manifest says {shard['count']}; "
                                f"{VERIFY_HINT}")
        except UserError as error:
            if bad_shards == "stop":
                raise
            bad.add(shard["url"])
            print(f"warning: {error}; skipped from now on ({len(bad)} bad shard(s) so far)", file=sys.stderr)
            continue
        if keep and len(kept) == seen:
            cache.add(shard["url"], kept)


class SampleCache:
    """Training shards kept in memory, decoded, so that every epoch after the first neither reads nor decodes them.

    Whole shards are kept, in the order they are first read, while the decoded audio they hold stays under
    `max_gb` GiB (16-bit FLAC as int16: 96 KB per 3 s clip at 16 kHz); a shard that would not fit is read from
    disk every epoch, decoded whole only the first time (to learn its size). Batches are the same, bit for bit, as
    without the cache. Pass one cache to every epoch's `train_batches` in the same process: DataLoader workers start
    afresh each epoch, so it needs num_workers=0.
    """

    def __init__(self, max_gb: float) -> None:
        self.max_bytes = int(max_gb * 2**30)
        self.bytes = 0
        self.shards: dict[str, list[dict]] = {}
        self.too_large: set[str] = set()  # shards that did not fit when they were offered

    def wants(self, url: str) -> bool:
        """Whether reading the shard at `url` should decode it whole for the cache."""
        return self.bytes < self.max_bytes and url not in self.too_large

    def add(self, url: str, samples: list[dict]) -> None:
        size = sum(sample["pcm"].nbytes for sample in samples)
        if self.bytes + size <= self.max_bytes:
            self.shards[url] = samples
            self.bytes += size
        else:
            self.too_large.add(url)


def _decoded(sample: dict) -> dict:
    """A raw sample with its metadata checked and its FLAC decoded whole: int16 for 16-bit FLAC (what pack
    writes; soundfile's float32 of such a file is exactly the int16 / 32768), float32 otherwise."""
    meta = _metadata(sample)
    with soundfile.SoundFile(io.BytesIO(sample["flac"])) as audio:
        pcm = audio.read(dtype="int16" if audio.subtype == "PCM_16" else "float32", always_2d=True)
        rate = audio.samplerate
    return {"__key__": sample["__key__"], "__url__": sample.get("__url__"), "meta": meta, "pcm": pcm, "rate": rate}


def _shuffle(src: Iterator[dict], *, plan: _Plan, buffer: int) -> Iterator[dict]:
    """webdataset's shuffle buffer, with an rng made per worker at iteration time so replays are identical.

    The buffer never exceeds one reader's share of the data: the stream repeats, and a larger buffer would
    fill up with second copies of the same clips before the first batch.
    """
    buffer = min(buffer, math.ceil(plan.chunk / _worker()[1]))
    if buffer <= 1:
        return src
    return wds.shuffle(buffer, buffer, rng=plan.rng("shuffle"))(src)


# ----------------------------------------------------------------------------------------------------
# Samples -> examples


@dataclass
class _Example:
    """A decoded training clip: audio (views, samples) plus the labels that mixing combines."""

    audio: np.ndarray
    instruments: frozenset[str]
    genre: int
    labelled: bool
    key: str
    song: str


def _metadata(sample: dict) -> SampleMeta:
    """The sample's json, checked: both files present, known instrument and genre codes."""
    where = f"{sample.get('__url__')}: sample {sample['__key__']}"
    for extension in SAMPLE_FILES:
        if extension not in sample:
            raise UserError(f"{where} has no .{extension} file; re-pack the shards with `python -m shards pack`")
    try:
        meta = json.loads(sample["json"])
        vocab.parse_instruments(meta.get("instruments") or [])
        vocab.genre_index(meta.get("genre"))
    except ValueError as error:  # bad json or an UnknownLabel
        raise UserError(f"{where}: {error}; re-pack the shards with `python -m shards pack`") from None
    return meta


@contextmanager
def _reader(sample: dict) -> Iterator[tuple[int, int, int, Callable[[int, int], np.ndarray]]]:
    """(sample rate, frames, channels, read(start, frames) -> float32 (frames, channels)) of a sample's audio:
    its decoded `pcm` when it came from a SampleCache, else its FLAC bytes, of which only what is read is decoded."""
    if "pcm" in sample:
        pcm = sample["pcm"]
        scale = np.float32(1 / 32768) if pcm.dtype == np.int16 else np.float32(1)
        yield sample["rate"], len(pcm), pcm.shape[1], lambda start, frames: pcm[start: start + frames] * scale
        return
    with soundfile.SoundFile(io.BytesIO(sample["flac"])) as audio:
        def read(start: int, frames: int) -> np.ndarray:
            if start != audio.tell():  # a FLAC seek restarts the decoder; a whole clip needs none
                audio.seek(start)
            return audio.read(frames, dtype="float32", always_2d=True)

        yield audio.samplerate, audio.frames, audio.channels, read


def _crops(sample: dict, *, seconds: float, sample_rate: int, views: int, view_source: ViewSource,
           rng: random.Random) -> np.ndarray:
    """`views` crops of `seconds`, zero-padded at a random offset when the clip is shorter: (views, samples).

    view_source "crops": each view is its own random crop of the mono mix. "channels": one random crop, and view v
    is its channel v (modulo the channel count, so a mono clip gives identical views), e.g. the two renderings of a
    `shards synth --pair-fonts` track packed with `--channels 2`. "channel-crops": view v is its own random crop of
    channel v, so paired renderings give views that share the instruments but neither the timbre nor the notes
    (tracks packed whole, not as segments of the clip's length, for crops that differ).
    Only the cropped frames are decoded: FLAC is seekable, so a 3 s crop of a long song costs 3 s of decoding.
    Shards already mono at `sample_rate` (what pack writes by default) need no conversion.
    """
    length = round(seconds * sample_rate)
    out = np.zeros((views, length), dtype=np.float32)
    with _reader(sample) as (rate, frames, channels, read):
        need = math.ceil(seconds * rate)
        block, offset = None, 0
        for view in range(views):
            fresh = block is None or view_source != "channels"
            if fresh:
                start = rng.randint(0, frames - need) if frames > need else 0
                block = read(start, min(need, frames))
            piece = block if view_source == "crops" else block[:, view % channels][:, None]
            clip = piece[:length, 0] if rate == sample_rate and piece.shape[1] == 1 else \
                to_mono(piece, rate, sample_rate).numpy()[:length]
            if fresh:
                offset = rng.randint(0, length - len(clip)) if frames < need else 0
            out[view, offset: offset + len(clip)] = clip
    return out


def _examples(src: Iterator[dict], *, plan: _Plan, seconds: float, sample_rate: int, views: int,
              view_source: ViewSource) -> Iterator[_Example]:
    rng = plan.rng("crop")
    for sample in src:
        meta = sample["meta"] if "pcm" in sample else _metadata(sample)
        instruments = frozenset(meta.get("instruments") or ())
        yield _Example(
            audio=_crops(sample, seconds=seconds, sample_rate=sample_rate, views=views, view_source=view_source,
                         rng=rng),
            instruments=instruments,
            genre=vocab.genre_index(meta.get("genre")),
            labelled=bool(instruments),
            key=sample["__key__"],
            song=str(meta.get("song", sample["__key__"])),
        )


def _mixable(a: _Example, b: _Example, *, same_genre: bool) -> bool:
    """Labelled clips mix only with labelled ones (a mixture's labels must be complete), same song never."""
    if a.labelled != b.labelled or a.song == b.song:
        return False
    return not same_genre or (a.genre >= 0 and a.genre == b.genre)


def _mix_examples(parts: Sequence[_Example], rng: random.Random) -> _Example:
    """Sum clips into one polyphonic example labelled with the union of their instruments.

    Each clip is brought to the loudness of the first, given a random gain in MIX_GAIN_DB, and the sum is
    scaled down if its peak would exceed PEAK, so no mixture clips and none is dominated by a loud recording.
    """
    reference = math.sqrt(float(np.mean(parts[0].audio**2)))
    audio = np.zeros_like(parts[0].audio)
    for part in parts:
        level = math.sqrt(float(np.mean(part.audio**2)))
        match = reference / level if level > 1e-4 and reference > 1e-4 else 1.0
        audio += part.audio * (match * 10 ** (rng.uniform(*MIX_GAIN_DB) / 20))
    peak = float(np.abs(audio).max())
    if peak > PEAK:
        audio *= PEAK / peak
    genres = {part.genre for part in parts}
    return _Example(
        audio=audio,
        instruments=frozenset().union(*(part.instruments for part in parts)),
        genre=genres.pop() if len(genres) == 1 else -1,
        labelled=parts[0].labelled,
        key="+".join(part.key for part in parts),
        song="+".join(part.song for part in parts),
    )


def _mix(
    src: Iterator[_Example], *, plan: _Plan, mix_max: int, probability: float, same_genre: bool
) -> Iterator[_Example]:
    """With `probability`, mix each clip with 1..mix_max-1 recent clips, all mutually compatible (no song twice)."""
    rng = plan.rng("mix")
    pool: deque[_Example] = deque(maxlen=MIX_POOL)
    for example in src:
        out = example
        if mix_max >= 2 and rng.random() < probability:
            parts, size = [example], rng.randint(2, mix_max)
            for other in rng.sample(list(pool), len(pool)):
                if len(parts) < size and all(_mixable(part, other, same_genre=same_genre) for part in parts):
                    parts.append(other)
            if len(parts) > 1:
                out = _mix_examples(parts, rng)
        pool.append(example)
        yield out


def _collate(examples: list[_Example]) -> Batch:
    audio = torch.from_numpy(np.stack([e.audio for e in examples]))
    return Batch(
        audio=rearrange(audio, "b 1 s -> b s") if audio.shape[1] == 1 else audio,
        targets=torch.from_numpy(np.stack([vocab.multi_hot(e.instruments) for e in examples])),
        families=torch.from_numpy(np.stack([vocab.family_multi_hot(e.instruments) for e in examples])),
        genre=torch.tensor([e.genre for e in examples], dtype=torch.int64),
        labelled=torch.tensor([e.labelled for e in examples], dtype=torch.bool),
        key=[e.key for e in examples],
        song=[e.song for e in examples],
    )


def _quota(src: Iterator[dict], *, plan: _Plan) -> Iterator[dict]:
    return islice(src, _batch_quota(plan.batches, *_worker()))


# ----------------------------------------------------------------------------------------------------
# Public entry points


def train_batches(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int,
    clip_seconds: float = 3.0,
    sample_rate: int = 16000,
    mix_max: int = 1,
    mix_probability: float = 0.5,
    same_genre_mix: bool = False,
    views: int = 1,
    view_source: ViewSource = "crops",
    shuffle_buffer: int = 512,
    batches_per_epoch: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    bad_shards: str = "stop",
    cache: SampleCache | None = None,
) -> Iterable[dict]:
    """One epoch of training batches for this rank: exactly `batches_per_epoch` of them on every rank.

    The default epoch is ceil(samples / (batch_size * world_size)) batches, so each sample is seen about
    once per epoch over all ranks. Batches are `shards.format.Batch` dicts. With mix_max >= 2, each clip is mixed
    with probability `mix_probability` with 1..mix_max-1 recent clips of other songs (labelled only with labelled, of its own
    genre with `same_genre_mix`) and carries the union of their labels; its key and song join theirs with '+'.
    Identical for the same (seed, epoch, rank, world_size) and num_workers. With num_workers > 0 the result is a webdataset WebLoader over DataLoader workers; with 0
    it is a plain iterable dataset that may also be wrapped in `DataLoader(..., batch_size=None)`.
    A shard that does not read stops the run (`bad_shards="stop"`) or is skipped with a warning ("skip").
    The same `cache` passed to every epoch keeps the shards decoded in memory after their first reading.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("views", views, 1), ("mix_max", mix_max, 1)):
        if value < least:
            raise UserError(f"{name}={value}: must be at least {least}")
    if clip_seconds <= 0 or sample_rate <= 0:
        raise UserError(f"clip_seconds={clip_seconds}, sample_rate={sample_rate}: both must be positive")
    if not 0 <= mix_probability <= 1:
        raise UserError(f"mix_probability={mix_probability}: must lie between 0 and 1")
    if bad_shards not in BAD_SHARD_POLICIES:
        raise UserError(f"bad_shards={bad_shards!r}: choose one of {', '.join(BAD_SHARD_POLICIES)}")
    if view_source not in VIEW_SOURCES:
        raise UserError(f"view_source={view_source!r}: choose one of {', '.join(VIEW_SOURCES)}")
    if (batches_per_epoch is not None and batches_per_epoch < 1) or num_workers < 0:
        raise UserError(f"batches_per_epoch={batches_per_epoch}, num_workers={num_workers}: need >= 1 and >= 0")
    if cache is not None and num_workers > 0:
        raise UserError(f"num_workers={num_workers} with a sample cache: DataLoader workers start afresh every epoch "
                        "and would drop it; set data.num_workers=0 or data.cache_gb=0")
    rank, world_size = _distributed(rank, world_size)
    urls = shard_urls(spec)
    counts = _shard_counts(urls)
    total = sum(counts)
    if total == 0:
        raise UserError(f"{urls[0]}: the shards hold no samples; {PACK_HINT}")
    if batches_per_epoch is None:
        batches_per_epoch = math.ceil(total / (batch_size * world_size))
    plan = _Plan(
        urls=tuple(urls),
        counts=tuple(counts),
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batches=batches_per_epoch,
    )
    pipeline = wds.DataPipeline(
        partial(_endless_shards, plan),
        partial(_split_by_rank, plan=plan),
        partial(_split_by_worker, plan=plan),
        partial(_read, plan=plan, bad_shards=bad_shards, cache=cache),
        partial(_shuffle, plan=plan, buffer=shuffle_buffer),
        partial(_examples, plan=plan, seconds=clip_seconds, sample_rate=sample_rate, views=views,
                view_source=view_source),
        partial(_mix, plan=plan, mix_max=mix_max, probability=mix_probability, same_genre=same_genre_mix),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        partial(_quota, plan=plan),
    )
    if num_workers > 0:
        pipeline = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
    with warnings.catch_warnings():  # webdataset warns that a length does not size the epoch; _quota does
        warnings.simplefilter("ignore", UserWarning)
        return pipeline.with_length(batches_per_epoch)


def sample_metadata(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[dict]:
    """The checked json metadata of every sample in `spec`, in shard order, without decoding audio."""
    for url in shard_urls(spec):
        for sample in _tar_samples(url):
            yield _metadata(sample)


def eval_samples(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    sample_rate: int | None = None,
) -> Iterator[dict]:
    """Every sample once across ranks (rank r gets samples r, r + world, ... in shard order), full length.

    Splitting by sample rather than by shard keeps ranks within one sample of each other whatever the
    shard sizes. Audio is mono float32 at the stored rate, or resampled to `sample_rate` when given.
    """
    rank, world_size = _distributed(rank, world_size)
    urls = shard_urls(spec)
    return _eval_stream(urls, rank=rank, world_size=world_size, sample_rate=sample_rate)


def _eval_stream(urls: list[str], *, rank: int, world_size: int, sample_rate: int | None) -> Iterator[dict]:
    samples = (sample for url in urls for sample in _tar_samples(url))
    for sample in islice(samples, rank, None, world_size):
        meta = _metadata(sample)
        with soundfile.SoundFile(io.BytesIO(sample["flac"])) as audio:
            rate = audio.samplerate
            target = sample_rate or rate
            waveform = to_mono(audio.read(dtype="float32", always_2d=True), rate, target)
        instruments = list(vocab.parse_instruments(meta.get("instruments") or []))
        yield dict(
            audio=waveform,
            sample_rate=target,
            targets=torch.from_numpy(vocab.multi_hot(instruments)),
            families=torch.from_numpy(vocab.family_multi_hot(instruments)),
            instruments=instruments,
            genre=vocab.genre_index(meta.get("genre")),
            labelled=bool(instruments),
            key=sample["__key__"],
            song=str(meta.get("song", sample["__key__"])),
            path=str(meta.get("path", "")),
        )


def _fit(audio: np.ndarray, length: int) -> np.ndarray:
    """(samples,) cut or zero-padded to `length`."""
    return np.pad(audio[:length], (0, max(0, length - audio.shape[-1])))


MIXTURE_SIZES = {1: 0.2, 2: 0.35, 3: 0.3, 4: 0.15}  # instruments per IRMAS-like test file (shards.synth's test set)
FILE_SECONDS = (5.0, 20.0)  # the length of IRMAS test excerpts (and of shards.synth's)


def _pick_parts(rng: random.Random, groups: Sequence[list[dict]], size: int) -> list[list[dict]]:
    """Up to `size` of `groups` (each: samples of one song and instrument), of different songs and instruments."""
    parts: list[list[dict]] = []
    for candidate in rng.sample(groups, len(groups)):
        if len(parts) == size:
            break
        first = candidate[0]
        if all(first["song"] != part[0]["song"] and not set(first["instruments"]) & set(part[0]["instruments"])
               for part in parts):
            parts.append(candidate)
    return parts


def _mixed_sample(parts: Sequence[dict], length: int, rng: random.Random) -> _Example:
    """One sample of each part, cut or zero-padded to `length`, summed by the training mixtures' loudness rule."""
    examples = [_Example(audio=_fit(part["audio"].numpy(), length)[None], instruments=frozenset(part["instruments"]),
                         genre=part["genre"], labelled=True, key=part["key"], song=part["song"]) for part in parts]
    return _mix_examples(examples, rng) if len(examples) > 1 else examples[0]


def _labelled_sample(audio: np.ndarray, instruments: frozenset[str], key: str) -> dict:
    labels = sorted(instruments)
    return dict(audio=torch.from_numpy(audio.astype(np.float32)), instruments=labels,
                targets=torch.from_numpy(vocab.multi_hot(labels)), key=key)


def validation_mixtures(samples: Sequence[dict], *, count: int | None = None, seed: int = 0,
                        sizes: dict[int, float] = MIXTURE_SIZES) -> list[dict]:
    """`count` (default: one per labelled sample) polyphonic examples built like test files from single-instrument
    `eval_samples` outputs.

    Each draws a number of instruments from `sizes` and sums one sample of each, all of different songs and
    different labelled instruments, by the same loudness-matched rule as training mixtures (cut or zero-padded to
    the first sample's length); `targets` is the union of their labels. Thresholds tuned on these fit files with
    1-4 instruments, where ones tuned on single clips sit too high. Deterministic for the same samples and seed.
    """
    labelled = [[sample] for sample in samples if sample["labelled"]]
    if not labelled:
        return []
    rng = random.Random(f"{seed}:validation-mixtures")
    out = []
    for _ in range(len(labelled) if count is None else count):
        size = rng.choices(list(sizes), weights=list(sizes.values()))[0]
        parts = [part[0] for part in _pick_parts(rng, labelled, size)]
        mixed = _mixed_sample(parts, parts[0]["audio"].shape[-1], rng)
        out.append(_labelled_sample(mixed.audio[0], mixed.instruments, mixed.key))
    return out


def validation_files(samples: Sequence[dict], *, count: int | None = None, seed: int = 0,
                     sizes: dict[int, float] = MIXTURE_SIZES, seconds: tuple[float, float] = FILE_SECONDS) -> list[dict]:
    """`count` (default: one per two labelled samples) whole test-like files, longer than one clip, from
    single-instrument `eval_samples` outputs.

    Each draws a number of instruments from `sizes` and one held-out song per instrument (different songs), and a
    length in `seconds`; its audio is the songs' clips in turn, the k-th clip of every part summed as
    `validation_mixtures` sums them (a song with fewer clips starts again from its first), cut to that length. A model
    scores such a file by aggregating its windows, as it scores test files, so thresholds tuned on these see what the
    aggregate does to scores (the max over windows raises absent instruments' scores too). Deterministic for the same
    samples and seed.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    for sample in samples:
        if sample["labelled"]:
            groups.setdefault((sample["song"], tuple(sample["instruments"])), []).append(sample)
    if not groups:
        return []
    songs = [sorted(group, key=lambda sample: sample["key"]) for group in groups.values()]
    rng = random.Random(f"{seed}:validation-files")
    out = []
    labelled = sum(len(song) for song in songs)
    for _ in range(max(1, labelled // 2) if count is None else count):
        size = rng.choices(list(sizes), weights=list(sizes.values()))[0]
        parts = _pick_parts(rng, songs, size)
        clip = parts[0][0]["audio"].shape[-1]
        sample_rate = parts[0][0]["sample_rate"]
        length = round(rng.uniform(*seconds) * sample_rate)
        pieces = [_mixed_sample([part[k % len(part)] for part in parts], clip, rng)
                  for k in range(math.ceil(length / clip))]
        audio = np.concatenate([piece.audio[0] for piece in pieces])[:length]
        out.append(_labelled_sample(audio, pieces[0].instruments, "+".join(part[0]["song"] for part in parts)))
    return out


@dataclass
class DataConfig:
    """The `data:` section of both recipe schemas (pretraining and fine-tuning): which shards, and how they become
    batches (the arguments of `train_batches`)."""

    train: str | list[str] | None = None  # shard directories, patterns or URLs streamed for training
    val: str | list[str] | None = None  # song-grouped validation shards (fine-tuning: thresholds, best checkpoint)
    clip_seconds: float = 3.0
    sample_rate: int = 16000
    mix_max: int = 1  # up to this many clips summed into one polyphonic example, labels unioned ...
    mix_probability: float = 0.5  # ... for this share of the examples
    same_genre_mix: bool = False
    views: int = 1  # crops per clip (contrastive pretraining)
    view_source: ViewSource = "crops"  # views as random crops of the mix, the channels of one crop, or a crop each
    shuffle_buffer: int = 512
    batches_per_epoch: int | None = None  # default: one pass over the shards
    num_workers: int = 0
    bad_shards: BadShards = "stop"  # a shard that does not read: stop the run, or skip it
    cache_gb: float = 0.0  # keep up to this many GiB of training audio decoded in memory across epochs (num_workers 0)

    def sample_cache(self) -> SampleCache | None:
        """The SampleCache that `cache_gb` asks for (one per run: pass it to every epoch's `batches`), or None."""
        if self.cache_gb < 0:
            raise UserError(f"data.cache_gb={self.cache_gb}: must be at least 0 (0 decodes every epoch)")
        return SampleCache(self.cache_gb) if self.cache_gb > 0 else None

    def batches(self, *, batch_size: int, seed: int, epoch: int, cache: SampleCache | None = None) -> Iterable[Batch]:
        """`train_batches` over `train` with this section's settings."""
        stream = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("train", "val", "cache_gb")}
        return train_batches(self.train, batch_size=batch_size, seed=seed, epoch=epoch, cache=cache, **stream)
