"""`python -m shards pack SOURCE INPUT OUTDIR`: audio -> WebDataset tar shards + manifest.json.

Every input ends up either packed or listed as skipped with a one-line reason
(`packed + skipped == inputs`). Each split's inputs are written in a seeded random order (see `shuffled`). Work is spread over a process pool whose results come back
in input order, so the shards are byte-identical whatever the worker count. Inputs are fed
to the pool one shard-sized window at a time, which bounds memory by the shard size.

Shards are written as `shard-NNNNNN.tar.tmp` and renamed when complete; after each rename
the progress is recorded in `OUTDIR/.pack-state.json`. Running the same command again after
an interruption keeps the complete shards whose checksums still match, drops partial
files and continues from the first input that is not in a complete shard.

manifest.json (stats = {"samples", "duration" (s), "unlabelled", "instruments"|"genres"|"drums":
{code or "unknown": {"samples", "duration"}}}):
    format "timbre-shards", version 1, source, input (absolute path), options (PackOptions fields),
    inputs, packed, skipped (packed + skipped == inputs), samples, duration,
    instruments / genres / drums: {code: samples},
    splits: {name: {inputs, packed, skipped, shards, **stats}},
    shards: [{split, path (relative to OUTDIR), bytes, sha256, **stats}],
    skips: [{path, reason, split (null when found while scanning)}],
    dropped_segments: [{path, start, reason}]  (silent segments of files cut with --segment-seconds),
    ignored: [paths of files that are not inputs, e.g. README.txt, cover.jpg]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import torch
import webdataset as wds

from core.errors import UserError, positive_float, positive_int
from core.files import write_json
from core.progress import progress_bar
from shards.audio import BadAudio, convert, encode_flac, is_silent, read_segments
from shards.format import FORMAT, MANIFEST, SHARD_NAME, TEMP_SUFFIX, VERSION, SampleMeta
from shards.sources import SOURCES, Record, Scan, Skip, scan
from shards.split import TRAIN, VAL, split_by_song

STATE = ".pack-state.json"
TASK_INPUTS = 4  # inputs per worker task
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
UNKNOWN = "unknown"  # manifest bucket for samples without a genre / drums tag


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """Everything that determines the content of the shards (recorded in the manifest)."""

    source: str
    sample_rate: int = 16000
    channels: int = 1
    shard_size: int = 256
    val_fraction: float | None = None
    segment_seconds: float | None = None
    split: str | None = None
    seed: int = 0

    @property
    def main_split(self) -> str:
        return self.split or ("test" if self.source == "irmas-test" else TRAIN)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"{self.source}: unknown source; choose one of {', '.join(SOURCES)}")
        for name, value in (("--sample-rate", self.sample_rate), ("--channels", self.channels),
                            ("--shard-size", self.shard_size)):
            if value < 1:
                raise UserError(f"{name} {value}: must be a positive integer")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise UserError(f"--segment-seconds {self.segment_seconds}: must be positive, e.g. 3")
        if not SPLIT_NAME.match(self.main_split):
            raise UserError(f"--split {self.main_split!r}: use only letters, digits, '_' and '-'")
        if self.val_fraction is not None and self.main_split == VAL:
            raise UserError("--split val: the name 'val' is taken by --val-fraction; choose another split name")


@dataclass(frozen=True, kw_only=True)
class Sample:
    key: str
    flac: bytes
    meta: SampleMeta


@dataclass(frozen=True, kw_only=True)
class Packed:
    samples: list[Sample]
    dropped: list[dict]  # silent segments of a long file: {"path", "start", "reason"}


# ---------------------------------------------------------------- worker side


def encode_record(record: Record, *, options: PackOptions) -> Packed | Skip:
    """Decode, check, convert and FLAC-encode one input (runs in a worker process)."""
    samples, dropped = [], []
    try:
        segments = read_segments(record.path, segment_seconds=options.segment_seconds)
        for index, (start, block, rate) in enumerate(segments):
            if is_silent(block):
                if options.segment_seconds is None:
                    return Skip(path=record.relpath, reason="silent audio (peak below -80 dBFS)")
                dropped.append({"path": record.relpath, "start": round(start, 6), "reason": "silent segment"})
                continue
            block = convert(block, rate, sample_rate=options.sample_rate, channels=options.channels)
            key = record.key if options.segment_seconds is None else f"{record.key}-{index:05d}"
            meta = SampleMeta(
                key=key,
                instruments=list(record.instruments),
                genre=record.genre,
                drums=record.drums,
                song=record.song,
                path=record.relpath,
                start=round(start, 6),
                duration=round(block.shape[0] / options.sample_rate, 6),
                sample_rate=options.sample_rate,
                channels=options.channels,
                num_samples=int(block.shape[0]),
                source=record.source,
            )
            samples.append(Sample(key=key, flac=encode_flac(block, options.sample_rate), meta=meta))
    except BadAudio as error:
        return Skip(path=record.relpath, reason=str(error))
    except (OSError, RuntimeError, ValueError) as error:  # e.g. an I/O error halfway through a file
        reason = f"could not decode ({type(error).__name__}: {error})"
        return Skip(path=record.relpath, reason=" ".join(reason.split()))
    if not samples:
        return Skip(path=record.relpath, reason="silent audio in every segment (peak below -80 dBFS)")
    return Packed(samples=samples, dropped=dropped)


def _worker_init() -> None:
    torch.set_num_threads(1)  # parallelism comes from the processes


# ---------------------------------------------------------------- shards


@dataclass(kw_only=True)
class ShardStats:
    """Counts and durations of the samples in a shard (or a split), per class, genre and drums tag."""

    samples: int = 0
    duration: float = 0.0
    unlabelled: int = 0
    instruments: dict[str, dict] = field(default_factory=dict)
    genres: dict[str, dict] = field(default_factory=dict)
    drums: dict[str, dict] = field(default_factory=dict)

    def add(self, meta: dict) -> None:
        duration = meta["duration"]
        self.samples += 1
        self.duration += duration
        self.unlabelled += not meta["instruments"]
        buckets = [(self.instruments, code) for code in meta["instruments"]]
        buckets += [(self.genres, meta["genre"] or UNKNOWN), (self.drums, meta["drums"] or UNKNOWN)]
        for table, name in buckets:
            entry = table.setdefault(name, {"samples": 0, "duration": 0.0})
            entry["samples"] += 1
            entry["duration"] += duration

    def merge(self, other: dict) -> None:
        self.samples += other["samples"]
        self.duration += other["duration"]
        self.unlabelled += other["unlabelled"]
        for name in ("instruments", "genres", "drums"):
            mine = getattr(self, name)
            for code, entry in other[name].items():
                target = mine.setdefault(code, {"samples": 0, "duration": 0.0})
                target["samples"] += entry["samples"]
                target["duration"] += entry["duration"]

    def as_dict(self) -> dict:
        def rounded(table: dict) -> dict:
            return {k: {"samples": v["samples"], "duration": round(v["duration"], 3)} for k, v in sorted(table.items())}

        return {
            "samples": self.samples,
            "duration": round(self.duration, 3),
            "unlabelled": self.unlabelled,
            "instruments": rounded(self.instruments),
            "genres": rounded(self.genres),
            "drums": rounded(self.drums),
        }


class ShardWriter:
    """Writes one tar at a time (webdataset's TarWriter) under a temporary name, renamed when complete; fixed member
    metadata make the bytes deterministic."""

    def __init__(self, *, directory: Path, index: int):
        self.directory = directory
        self.index = index
        self.handle: BinaryIO | None = None
        self.tar: wds.TarWriter | None = None
        self.stats = ShardStats()

    @property
    def name(self) -> str:
        return SHARD_NAME.format(self.index)

    def add(self, sample: Sample) -> None:
        if self.tar is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.directory / (self.name + TEMP_SUFFIX), "wb")
            self.tar = wds.TarWriter(self.handle, encoder=False, mtime=0, mode=0o644, user="", group="",
                                     format="PAX_FORMAT")
        payload = json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")
        self.tar.write({"__key__": sample.key, "flac": sample.flac, "json": payload})
        self.stats.add(sample.meta)

    def close(self) -> dict:
        """Finish the tar, rename it into place and return its manifest entry."""
        assert self.tar is not None and self.handle is not None
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        temp, final = self.directory / (self.name + TEMP_SUFFIX), self.directory / self.name
        os.replace(temp, final)
        entry = {"path": f"{self.directory.name}/{self.name}", "bytes": final.stat().st_size,
                 "sha256": sha256(final), **self.stats.as_dict()}
        self.tar, self.handle, self.stats, self.index = None, None, ShardStats(), self.index + 1
        return entry

    def abandon(self) -> None:
        if self.tar is not None and self.handle is not None:
            self.tar.close()
            self.handle.close()
            (self.directory / (self.name + TEMP_SUFFIX)).unlink(missing_ok=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- resume state


def _save_state(outdir: Path, state: dict) -> None:
    """The resume state, rewritten after every shard: compact JSON, which encodes several times faster than indented."""
    write_json(outdir / STATE, state, indent=None, temporary_suffix=TEMP_SUFFIX)


def shuffled(records: list[Record], *, seed: int, split: str) -> list[Record]:
    """The split's inputs in a seeded random order, so every shard holds a mix of classes and songs.

    Sources list inputs folder by folder (IRMAS: one instrument per folder), and a reader's shuffle buffer is smaller
    than the data set: shards written in that order fed training batches of one or two instruments at a time (the
    tiny ViTs then ranked at chance). WebDataset expects shards shuffled at write time; readers shuffle again.
    """
    order = list(records)
    random.Random(f"{seed}:pack-order:{split}").shuffle(order)
    return order


def fingerprint(records: Sequence[Record], skips: Sequence[Skip], options: PackOptions) -> str:
    """Hash of the options, the labels and the size/mtime of every input: what a resumed pack must match."""
    digest = hashlib.sha256(json.dumps({**asdict(options), "order": "shuffled"}, sort_keys=True).encode())
    for record in records:
        try:
            stat = os.stat(record.path)
            seen = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            seen = None
        digest.update(json.dumps([record.relpath, record.key, record.instruments, record.genre, record.drums,
                                  record.song, seen]).encode())
    for skip in skips:
        digest.update(json.dumps([skip.path, skip.reason]).encode())
    return digest.hexdigest()


def _load_state(outdir: Path, splits: Sequence[str], print_fn) -> dict | None:
    path = outdir / STATE
    if not path.exists():
        owned = [p for split in splits for p in (outdir / split).glob("shard-*.tar")]
        if owned or (outdir / MANIFEST).exists():
            raise UserError(f"{outdir}: already holds shards of another pack (no {STATE}); "
                            "delete the folder or choose a new OUTDIR")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print_fn(f"note: {path} is unreadable; packing from scratch")
        return None


def _resume_split(outdir: Path, split: str, state: dict | None) -> dict:
    """The still-valid part of a split's recorded progress; stray and partial files are removed."""
    directory = outdir / split
    for temp in directory.glob(f"*{TEMP_SUFFIX}"):
        temp.unlink()
    fresh = {"shards": [], "skips": [], "dropped": [], "packed": 0, "next": [0, 0], "done": False}
    state = state or fresh
    valid = []
    for entry in state["shards"]:
        path = outdir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            break
        valid.append(entry)
    if len(valid) < len(state["shards"]):
        last = valid[-1] if valid else None
        state = {
            "shards": valid,
            "skips": state["skips"][: last["resume"]["skips"]] if last else [],
            "dropped": state["dropped"][: last["resume"]["dropped"]] if last else [],
            "packed": last["resume"]["packed"] if last else 0,
            "next": last["resume"]["next"] if last else [0, 0],
            "done": False,
        }
    keep = {outdir / entry["path"] for entry in state["shards"]}
    for stray in directory.glob("shard-*.tar"):
        if stray not in keep:
            stray.unlink()
    return state


# ---------------------------------------------------------------- pack


def pack(input_path: str | os.PathLike, outdir: str | os.PathLike, *, options: PackOptions, workers: int = 1,
         progress: bool = True, print_fn=print) -> dict:
    """Pack `input_path` into `outdir`; returns the manifest (also written to OUTDIR/manifest.json)."""
    options.validate()
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    outdir = Path(outdir)
    found = scan(options.source, input_path)
    if found.inputs == 0:
        raise UserError(f"{input_path}: no audio files found for source {options.source}; "
                        "check the path (and the source name)")
    records = found.records
    if options.val_fraction is not None:
        assigned = split_by_song(records, fraction=options.val_fraction, seed=options.seed)
        splits = [options.main_split, VAL]
    else:
        assigned = [options.main_split] * len(records)
        splits = [options.main_split]
    assigned = [options.main_split if s == TRAIN else s for s in assigned]

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{outdir}: cannot create the output folder ({error.strerror or error}); "
                        "choose a writable OUTDIR that is not a file") from None
    stamp = fingerprint(records, found.skips, options)
    state = _load_state(outdir, splits, print_fn)
    if state is not None and state.get("fingerprint") != stamp:
        raise UserError(f"{outdir}: holds an unfinished or finished pack of different inputs or options; "
                        "rerun the original command, delete the folder, or choose a new OUTDIR")
    resumed = state is not None
    state = {"fingerprint": stamp, "splits": {s: _resume_split(outdir, s, (state or {}).get("splits", {}).get(s))
                                              for s in splits}}
    _save_state(outdir, state)
    if resumed:
        kept = sum(len(split["shards"]) for split in state["splits"].values())
        print_fn(f"resuming {outdir}: {kept} complete shard(s) kept (checksums match)")

    encode = partial(encode_record, options=options)
    in_flight = min(options.shard_size, 4 * TASK_INPUTS * workers)  # keeps every worker busy, a shard at most
    with _pool(workers) if workers > 1 else _one_thread() as pool:
        for split in splits:
            split_records = shuffled([r for r, s in zip(records, assigned) if s == split], seed=options.seed, split=split)
            _pack_split(split_records, outdir, split, state, encode, pool, in_flight, options, progress)

    counts = {split: assigned.count(split) for split in splits}
    manifest = build_manifest(found, counts, state, options, input_path)
    write_json(outdir / MANIFEST, manifest, temporary_suffix=TEMP_SUFFIX)
    _print_summary(manifest, outdir, print_fn)
    return manifest


def _pool(workers: int) -> multiprocessing.pool.Pool:
    """Worker processes: forked (instant, like torch's DataLoader) while this process runs no other
    Python thread; otherwise from a forkserver with the heavy imports preloaded once, since forking a
    threaded process can deadlock."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["shards.pack"])
    return context.Pool(workers, initializer=_worker_init)


@contextmanager
def _one_thread() -> Iterator[None]:
    """In-process packing with one torch thread: per-clip resampling is too small to gain from threads,
    and on a busy machine their contention makes it several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield None
    finally:
        torch.set_num_threads(before)


def _pack_split(records: list[Record], outdir: Path, split: str, state: dict, encode, pool, in_flight: int,
                options: PackOptions, progress: bool) -> None:
    progress_state = state["splits"][split]
    if progress_state["done"]:
        return
    first, offset = progress_state["next"]
    writer = ShardWriter(directory=outdir / split, index=len(progress_state["shards"]))
    bar = progress_bar(total=len(records), initial=first, desc=f"pack {split}", unit="file", enabled=progress)
    try:
        for position, result in _results(records, first, encode, pool, in_flight):
            if isinstance(result, Skip):
                progress_state["skips"].append({"path": result.path, "reason": result.reason})
            else:
                resumed_mid_input = position == first and offset > 0
                if not resumed_mid_input:
                    progress_state["dropped"].extend(result.dropped)
                    progress_state["packed"] += 1
                for index, sample in enumerate(result.samples):
                    if resumed_mid_input and index < offset:
                        continue
                    writer.add(sample)
                    if writer.stats.samples == options.shard_size:
                        done_input = index + 1 == len(result.samples)
                        _close(writer, progress_state, [position + 1, 0] if done_input else [position, index + 1])
                        _save_state(outdir, state)
            bar.update(1)
        if writer.stats.samples:
            _close(writer, progress_state, [len(records), 0])
        progress_state["next"], progress_state["done"] = [len(records), 0], True
        _save_state(outdir, state)
    finally:
        writer.abandon()
        bar.close()


def _results(records: list[Record], first: int, encode, pool, in_flight: int) -> Iterator[tuple[int, Packed | Skip]]:
    """(position, result) in input order, with at most `in_flight` inputs given to the pool (bounded memory).

    Inputs travel in tasks of TASK_INPUTS (fewer round trips through the pool's queues), and a new task is handed
    out as each one's results are taken, so the workers never wait for this process to write and checksum a shard.
    """
    if pool is None:
        yield from enumerate(map(encode, records[first:]), start=first)
        return
    tasks = (range(start, min(start + TASK_INPUTS, len(records))) for start in range(first, len(records), TASK_INPUTS))
    pending: deque = deque()

    def submit(span: range) -> None:
        pending.append((span, pool.apply_async(_encode_all, (encode, [records[i] for i in span]))))

    for span in islice(tasks, max(1, in_flight // TASK_INPUTS)):
        submit(span)
    while pending:
        span, result = pending.popleft()
        for later in islice(tasks, 1):
            submit(later)
        yield from zip(span, result.get())


def _encode_all(encode, records: list[Record]) -> list[Packed | Skip]:
    return [encode(record) for record in records]


def _close(writer: ShardWriter, progress_state: dict, next_input: list[int]) -> None:
    entry = writer.close()
    entry["resume"] = {"next": next_input, "skips": len(progress_state["skips"]),
                       "dropped": len(progress_state["dropped"]), "packed": progress_state["packed"]}
    progress_state["shards"].append(entry)
    progress_state["next"] = next_input


def build_manifest(found: Scan, split_inputs: dict[str, int], state: dict, options: PackOptions,
                   input_path: str | os.PathLike) -> dict:
    """manifest.json: options, counts, per-split/per-shard statistics and checksums, and every skip."""
    skips = [{"path": s.path, "reason": s.reason, "split": None} for s in found.skips]
    dropped, shards, split_tables, total, packed = [], [], {}, ShardStats(), 0
    for split, inputs in split_inputs.items():
        progress_state = state["splits"][split]
        skips += [{**s, "split": split} for s in progress_state["skips"]]
        dropped += progress_state["dropped"]
        stats = ShardStats()
        for entry in progress_state["shards"]:
            shard = {k: v for k, v in entry.items() if k != "resume"}
            shards.append({"split": split, **shard})
            stats.merge(shard)
            total.merge(shard)
        packed += progress_state["packed"]
        split_tables[split] = {"inputs": inputs, "packed": progress_state["packed"],
                               "skipped": len(progress_state["skips"]), "shards": len(progress_state["shards"]),
                               **stats.as_dict()}
    skips.sort(key=lambda s: (s["path"], s["reason"]))
    skipped, inputs = len(skips), found.inputs
    if packed + skipped != inputs:
        raise AssertionError(f"lost inputs: {packed} packed + {skipped} skipped != {inputs}")
    totals = total.as_dict()
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": options.source,
        "input": str(Path(input_path).resolve()),
        "options": asdict(options),
        "inputs": inputs,
        "packed": packed,
        "skipped": skipped,
        "samples": totals["samples"],
        "duration": totals["duration"],
        "instruments": {k: v["samples"] for k, v in totals["instruments"].items()},
        "genres": {k: v["samples"] for k, v in totals["genres"].items()},
        "drums": {k: v["samples"] for k, v in totals["drums"].items()},
        "splits": split_tables,
        "shards": shards,
        "skips": skips,
        "dropped_segments": dropped,
        "ignored": found.ignored,
    }


def _print_summary(manifest: dict, outdir: Path, print_fn, limit: int = 20) -> None:
    """What happened, in a few lines: counts per split and the skipped inputs with their reasons."""
    print_fn(f"packed {manifest['packed']} of {manifest['inputs']} inputs into {len(manifest['shards'])} shard(s) "
             f"under {outdir} ({manifest['samples']} samples, {manifest['duration'] / 60:.1f} min); "
             f"skipped {manifest['skipped']}")
    for split, table in manifest["splits"].items():
        print_fn(f"  {split}: {table['samples']} samples from {table['packed']} inputs in {table['shards']} shard(s), "
                 f"{table['duration'] / 60:.1f} min")
    for skip in manifest["skips"][:limit]:
        print_fn(f"  skipped {skip['path']}: {skip['reason']}")
    if manifest["skipped"] > limit:
        print_fn(f"  ... and {manifest['skipped'] - limit} more skipped inputs, listed in {outdir / MANIFEST}")
    if manifest["dropped_segments"]:
        print_fn(f"  dropped {len(manifest['dropped_segments'])} silent segment(s) of long files (see the manifest)")


# ---------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pack",
        help="pack audio into WebDataset shards",
        description="Decode, resample and pack audio into OUTDIR/<split>/shard-NNNNNN.tar plus OUTDIR/manifest.json. "
        "Rerun the same command to finish an interrupted pack.",
    )
    parser.add_argument("source", help=f"input layout: {', '.join(SOURCES)}")
    parser.add_argument("input", help="input folder (the CSV file for the csv source)")
    parser.add_argument("outdir", help="output folder for the shards and manifest.json")
    parser.add_argument("--sample-rate", type=positive_int, default=16000, help="resample to this rate (default 16000)")
    parser.add_argument("--channels", type=positive_int, default=1, help="mix or duplicate to this many channels (default 1)")
    parser.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="also write a song-grouped, label-stratified 'val' split with this fraction of the songs")
    parser.add_argument("--segment-seconds", type=positive_float, default=None,
                        help="cut files into segments of this length, one sample each (long unlabeled recordings)")
    parser.add_argument("--split", default=None, help="split name (default: train, or test for irmas-test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of the order of the "
                        "inputs in the shards (default 0)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any input was skipped")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = PackOptions(
        source=args.source, sample_rate=args.sample_rate, channels=args.channels, shard_size=args.shard_size,
        val_fraction=args.val_fraction, segment_seconds=args.segment_seconds, split=args.split, seed=args.seed,
    )
    manifest = pack(args.input, args.outdir, options=options, workers=args.workers, progress=not args.quiet)
    if args.strict and manifest["skipped"]:
        print(f"error: {manifest['skipped']} input(s) skipped and --strict is set; see {Path(args.outdir) / MANIFEST}",
              file=sys.stderr)
        return 1
    return 0
