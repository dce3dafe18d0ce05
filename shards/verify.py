"""`python -m shards verify OUTDIR` and `python -m shards stats OUTDIR [--plot FILE.png]`.

verify re-reads everything a pack wrote, with nothing but tarfile and soundfile, and
compares it with manifest.json: a shard that is missing, truncated, altered or holds
undecodable samples is named, and the exit status is 1. stats prints what the manifest
says is in each split, per instrument, genre and drums tag.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from core.errors import UserError, output_file
from shards.format import (
    FORMAT,
    MANIFEST,
    MANIFEST_FIELDS,
    SAMPLE_FIELDS,
    SAMPLE_FILES,
    SHARD_FIELDS,
    SPLIT_FIELDS,
    TEMP_SUFFIX,
)
from shards.pack import sha256
from shards.vocab import DRUMS, GENRES, INSTRUMENT_NAMES, INSTRUMENTS


def load_manifest(outdir: str | Path) -> dict:
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; pass an OUTDIR written by `python -m shards pack`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error}); repack into a fresh OUTDIR") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a Timbre shards manifest (format is not {FORMAT!r}); "
                        "pass an OUTDIR written by `python -m shards pack`")
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{path}: {problem}; repack with `python -m shards pack` into a fresh OUTDIR")
    for entry in manifest["shards"]:  # a path that leaves OUTDIR is refused before anything is read
        if not (Path(outdir) / entry["path"]).resolve().is_relative_to(Path(outdir).resolve()):
            raise UserError(f"{path}: shard path {entry['path']!r} points outside {outdir}; "
                            "repack with `python -m shards pack` into a fresh OUTDIR")
    return manifest




def _manifest_problem(manifest: dict) -> str | None:
    """What is missing or mistyped in a manifest with the right format tag (None when it is complete)."""
    problem = _lacks(manifest, MANIFEST_FIELDS, "the manifest")
    if problem:
        return problem
    records = [(f"split {split!r}", entry, SPLIT_FIELDS) for split, entry in manifest["splits"].items()]
    records += [(f"shards[{index}]", entry, SHARD_FIELDS) for index, entry in enumerate(manifest["shards"])]
    for where, record, fields in records:
        problem = _lacks(record, fields, where) if isinstance(record, dict) else f"{where} is not an object"
        if problem:
            return problem
    return None


def _lacks(record: dict, fields: dict, where: str) -> str | None:
    for name, kind in fields.items():
        if name not in record:
            return f"{where} lacks the field {name!r}"
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"{where} field {name!r} has the wrong type"
    return None


def check_shard(path: Path, entry: dict, seen: set[str] | None = None) -> list[str]:
    """Problems with one shard (empty list when it is whole): checksum, tar structure, samples, count,
    and keys already `seen` in other shards (the set is updated)."""
    if not path.is_file():
        return ["missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"size {size} bytes, manifest says {entry['bytes']} (truncated or altered)")
    if sha256(path) != entry["sha256"]:
        problems.append("sha256 does not match the manifest")
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.rpartition("/")[2].partition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(f"unreadable tar ({error})")
    decoded = 0
    seen = set() if seen is None else seen
    repeated = sorted(seen.intersection(members))
    if repeated:
        problems.append(f"{len(repeated)} key(s) also in an earlier shard, e.g. {repeated[0]}")
    seen.update(members)
    for key, parts in members.items():
        problem = _check_sample(key, parts)
        if problem:
            problems.append(problem)
        else:
            decoded += 1
    if decoded != entry["samples"]:
        problems.append(f"{decoded} decodable samples, manifest says {entry['samples']}")
    return problems


def _check_sample(key: str, parts: dict[str, bytes]) -> str | None:
    if set(parts) != set(SAMPLE_FILES):
        return f"sample {key}: has {', '.join(sorted(parts)) or 'nothing'}, expected flac and json"
    try:
        meta = json.loads(parts["json"])
    except ValueError:
        return f"sample {key}: json does not parse"
    missing = [name for name in SAMPLE_FIELDS if name not in meta]
    if missing:
        return f"sample {key}: json lacks {', '.join(missing)}"
    if meta["key"] != key:
        return f"sample {key}: json names the key {meta['key']!r}"
    try:
        audio, rate = sf.read(io.BytesIO(parts["flac"]), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        return f"sample {key}: flac does not decode ({error})"
    if (rate, audio.shape[1], audio.shape[0]) != (meta["sample_rate"], meta["channels"], meta["num_samples"]):
        return (f"sample {key}: audio is {audio.shape[0]} frames x {audio.shape[1]} ch at {rate} Hz, json says "
                f"{meta['num_samples']} x {meta['channels']} at {meta['sample_rate']}")
    if not np.isfinite(audio).all():
        return f"sample {key}: non-finite audio"
    return None


def verify(outdir: str | Path, *, print_fn=print) -> int:
    """Print one line per shard and a verdict; 0 when everything matches the manifest, else 1."""
    outdir = Path(outdir)
    manifest = load_manifest(outdir)
    bad = 0
    samples = 0
    listed, keys = set(), set()
    for entry in manifest["shards"]:
        path = outdir / entry["path"]
        listed.add(path)
        problems = [" ".join(problem.split()) for problem in check_shard(path, entry, keys)]
        samples += entry["samples"] if not problems else 0
        bad += bool(problems)
        print_fn(f"{entry['path']}: " + ("ok" if not problems else "BAD: " + "; ".join(problems)))
    for split in manifest["splits"]:
        for extra in sorted((outdir / split).glob("shard-*.tar*")):
            if extra not in listed:
                kind = "partial shard of an unfinished pack" if extra.name.endswith(TEMP_SUFFIX) else "not in manifest"
                print_fn(f"{split}/{extra.name}: BAD: {kind}")
                bad += 1
    total = sum(s["samples"] for s in manifest["splits"].values())
    if total != manifest["samples"] or sum(e["samples"] for e in manifest["shards"]) != total:
        print_fn("manifest: BAD: split, shard and total sample counts disagree")
        bad += 1
    if bad:
        print_fn(f"verify: {bad} problem(s) in {outdir}; repack with `python -m shards pack` into a fresh OUTDIR")
        return 1
    print_fn(f"verify: {len(manifest['shards'])} shard(s), {samples} samples, all match {outdir / MANIFEST}")
    return 0


def stats_table(manifest: dict) -> str:
    """Per-split samples and minutes for every instrument, genre and drums tag, as aligned text."""
    splits = list(manifest["splits"])
    rows = [("", *[f"{s} n" for s in splits], *[f"{s} h:m:s" for s in splits])]

    def section(title: str, table: str, names: list[tuple[str, str]]) -> None:
        rows.append((f"[{title}]",) + ("",) * (2 * len(splits)))
        for code, label in names:
            entries = [manifest["splits"][s][table].get(code, {"samples": 0, "duration": 0.0}) for s in splits]
            if any(e["samples"] for e in entries):
                rows.append((label, *[str(e["samples"]) for e in entries],
                             *[_clock(e["duration"]) for e in entries]))

    section("instruments", "instruments", [(c, f"{c} {INSTRUMENT_NAMES[c]}") for c in INSTRUMENTS])
    section("genres", "genres", [(g, g) for g in (*GENRES, "unknown")])
    section("drums", "drums", [(d, d) for d in (*DRUMS, "unknown")])
    rows.append(("unlabelled", *[str(manifest["splits"][s]["unlabelled"]) for s in splits], *[""] * len(splits)))
    rows.append(("total", *[str(manifest["splits"][s]["samples"]) for s in splits],
                 *[_clock(manifest["splits"][s]["duration"]) for s in splits]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    head = (f"{manifest['source']}: {manifest['inputs']} inputs, {manifest['packed']} packed, "
            f"{manifest['skipped']} skipped, {manifest['samples']} samples, {_clock(manifest['duration'])} (h:m:s)")
    return "\n".join([head, *lines])


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def plot_classes(manifest: dict, path: str | Path) -> Path:
    """Grouped bar chart: samples per instrument, one bar per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(manifest["splits"])
    x = np.arange(len(INSTRUMENTS))
    width = 0.8 / max(1, len(splits))
    figure, axes = plt.subplots(figsize=(10, 4))
    for i, split in enumerate(splits):
        counts = [manifest["splits"][split]["instruments"].get(c, {"samples": 0})["samples"] for c in INSTRUMENTS]
        axes.bar(x + (i - (len(splits) - 1) / 2) * width, counts, width, label=split)
    axes.set_xticks(x, [INSTRUMENT_NAMES[c] for c in INSTRUMENTS], rotation=30, ha="right")
    axes.set_ylabel("samples")
    axes.set_title(f"{manifest['source']}: class distribution per split")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    verify_parser = subparsers.add_parser(
        "verify", help="check every shard against manifest.json",
        description="Read every shard, decode every sample and compare counts and checksums with manifest.json.",
    )
    verify_parser.add_argument("outdir", help="a folder written by `python -m shards pack`")
    verify_parser.set_defaults(func=run_verify)
    stats_parser = subparsers.add_parser(
        "stats", help="per-class / genre / drums counts and durations per split",
        description="Print per-split counts and durations per instrument, genre and drums tag from manifest.json.",
    )
    stats_parser.add_argument("outdir", help="a folder written by `python -m shards pack`")
    stats_parser.add_argument("--plot", default=None, metavar="FILE.png", help="also save a class-distribution plot")
    stats_parser.set_defaults(func=run_stats)


def run_verify(args: argparse.Namespace) -> int:
    return verify(args.outdir)


def run_stats(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.outdir)
    plot = output_file(args.plot) if args.plot else None
    print(stats_table(manifest))
    if plot:
        print(f"plot: {plot_classes(manifest, plot)}")
    return 0
