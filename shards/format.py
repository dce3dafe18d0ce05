"""The shard format, owned here: the OUTDIR layout, `manifest.json`, the per-sample JSON and the batch contract.

    OUTDIR/manifest.json               {"format": FORMAT, "version", MANIFEST_FIELDS..., "splits": {name: SPLIT_FIELDS},
                                        "shards": [SHARD_FIELDS]}
    OUTDIR/<split>/shard-NNNNNN.tar    WebDataset tars; each sample is <key>.flac + <key>.json (a SampleMeta)

A shard is written under `<name>.tmp` and renamed when complete, so a name ending in `.tar` is a finished shard.
`pack` writes this format, `verify` checks it, `loader` reads it (and `finetune.losses` counts labels through the loader).
"""

from __future__ import annotations

from typing import TypedDict

import torch

FORMAT = "timbre-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
TEMP_SUFFIX = ".tmp"
SAMPLE_FILES = ("flac", "json")

# Field -> accepted type(s), for what verify and stats read from a manifest.
MANIFEST_FIELDS = {"source": str, "inputs": int, "packed": int, "skipped": int, "samples": int,
                   "duration": (int, float), "splits": dict, "shards": list}
SPLIT_FIELDS = {"samples": int, "duration": (int, float), "unlabelled": int, "instruments": dict, "genres": dict,
                "drums": dict}
SHARD_FIELDS = {"path": str, "samples": int, "bytes": int, "sha256": str}


class SampleMeta(TypedDict):
    """`<key>.json` of every sample."""

    key: str
    instruments: list[str]  # shards.vocab codes; empty: unlabelled
    genre: str | None  # shards.vocab genre code
    drums: str | None  # "dru" | "nod"
    song: str  # samples of one song share it (splits and mixing keep songs apart)
    path: str  # the input file, relative to the packed folder
    start: float  # seconds into that file
    duration: float  # seconds
    sample_rate: int
    channels: int
    num_samples: int
    source: str  # the source kind that packed it (irmas-train, folder, csv, ...)


SAMPLE_FIELDS = tuple(SampleMeta.__annotations__)


class Batch(TypedDict):
    """What `shards.loader.train_batches` yields, and what objectives and fine-tuning losses read."""

    audio: torch.Tensor  # float32 (B, samples), or (B, views, samples) with views > 1
    targets: torch.Tensor  # float32 (B, 11) instrument multi-hot (shards.vocab.INSTRUMENTS order)
    families: torch.Tensor  # float32 (B, 6) family multi-hot
    genre: torch.Tensor  # int64 (B,), -1 unknown
    labelled: torch.Tensor  # bool (B,)
    key: list[str]  # a mixture's keys joined with '+'
    song: list[str]  # likewise
