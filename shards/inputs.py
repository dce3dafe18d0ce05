"""What the reading commands take in, in one place: audio files, folders of audio, an IRMAS test folder, or shards ->
examples (a key, the mono float32 waveform at the model's rate, labels where the source has them).

`pretrain embed`, `finetune predict` and `finetune evaluate` read through here, so "shards or audio?" and
"file -> mono waveform" each have one answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from core.errors import UserError
from shards.audio import BadAudio, read_segments, to_mono
from shards.loader import eval_samples, is_shard_spec
from shards.sources import audio_files, scan


@dataclass
class Example:
    key: str  # the file's path, or the shard sample's key
    audio: Tensor  # (samples,) mono float32 at the requested rate
    path: str = ""  # where a shard sample came from (its original file), when recorded
    instruments: list[str] = field(default_factory=list)
    genre: int = -1  # index into shards.vocab.GENRES, -1 unknown


def read_mono(path: str | os.PathLike, sample_rate: int) -> Tensor:
    """Any file soundfile reads -> mono float32 (samples,) at `sample_rate`; raises shards.audio.BadAudio."""
    _, block, rate = next(read_segments(path))
    return to_mono(block, rate, sample_rate)


def is_shards(name: str | os.PathLike) -> bool:
    """Shards: a .tar file, a folder holding .tar files, or a URL / `pipe:` spec (audio must be local)."""
    text = str(name)
    return is_shard_spec(name) or "://" in text or text.startswith("pipe:")


def expand(names: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(name, is shards) for each input in order; a folder of audio gives its audio files (recursively, sorted)."""
    for name in names:
        if is_shards(name):
            yield name, True
        elif Path(name).is_dir():
            yield from ((str(file), False) for file in audio_files(name))
        else:
            yield name, False


def shard_examples(spec: str | list[str], sample_rate: int) -> Iterator[Example]:
    """Every sample of the shards named by `spec` (a pattern, folder, file or list), decoded at `sample_rate`."""
    for sample in eval_samples(spec, rank=0, world_size=1, sample_rate=sample_rate):
        yield Example(key=sample["key"], audio=torch.as_tensor(sample["audio"], dtype=torch.float32),
                      path=sample.get("path") or "", instruments=list(sample["instruments"]), genre=sample["genre"])


def is_irmas_folder(data: str) -> bool:
    """A directory without shards in it is an audio folder (the IRMAS test layout); anything else is shards."""
    return Path(data).is_dir() and not is_shard_spec(data)


def labelled_examples(data: str, *, sample_rate: int, skipped: list[dict]) -> Iterator[Example]:
    """The files of an IRMAS test folder (<name>.wav next to <name>.txt; key = relative path) or of test shards;
    unusable ones are appended to `skipped` as {"path", "reason"}."""
    if not is_irmas_folder(data):
        yield from shard_examples(data, sample_rate)
        return
    found = scan("irmas-test", data)
    skipped += [{"path": skip.path, "reason": skip.reason} for skip in found.skips]
    if not found.records:
        raise UserError(f"{data}: no labelled audio found; pass an IRMAS test folder (<name>.wav next to "
                        f"<name>.txt) or a test shard directory")
    for record in found.records:
        try:
            audio = read_mono(record.path, sample_rate)
        except BadAudio as error:
            skipped.append({"path": record.relpath, "reason": str(error)})
            continue
        yield Example(key=record.relpath, audio=audio, instruments=list(record.instruments))
