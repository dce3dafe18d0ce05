"""`python -m pretrain embed BACKBONE AUDIO_OR_SHARDS... --out FILE.npz`: clip embeddings for downstream use.

Inputs are audio files, folders of audio files, or shards (a `.tar`, a split folder or a pack
OUTDIR). Each file or shard sample is cut into windows of the backbone's clip length (the last
window is aligned to the end, so every sample is seen; files shorter than a window are embedded at
their own length), and its embedding is the mean of its windows' pooled embeddings.

The .npz holds `keys` (N,) — the file path, or the sample key for shards — `embeddings` (N, D)
float32 and `windows` (N,); with `--tokens` also the window-averaged patch tokens as one ragged
array: `tokens` (sum of K_i, D), `token_offsets` (N + 1,) and `token_grids` (N, 2) (frequency,
time patches), so file i's tokens are `tokens[token_offsets[i]:token_offsets[i + 1]]`.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pretrain.backbone import Backbone
from pretrain.frontend import LogMel
from pretrain.hub import load_backbone
from shards.audio import BadAudio, convert, read_segments
from core.errors import ArgumentParser, UserError, output_file, positive_float, positive_int
from shards.loader import eval_samples, is_shard_spec, shard_urls
from core.progress import progress_bar
from shards.sources import audio_files


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Window starts covering the whole signal: every `hop`, plus one aligned to the end; [0] when shorter than a window."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def inputs(paths: list[str], sample_rate: int, skipped: list[str]) -> Iterator[tuple[str, Tensor]]:
    """(key, mono waveform at sample_rate) for every audio file and shard sample named by `paths`."""
    for given in paths:
        path = Path(given)
        if not path.exists() and "://" not in given and not given.startswith("pipe:"):
            raise UserError(f"{given}: no such file or folder; pass audio files, folders of audio or shards")
        if is_shard_spec(path) or not path.exists():
            for sample in eval_samples(shard_urls(given), rank=0, world_size=1, sample_rate=sample_rate):
                yield sample["key"], torch.as_tensor(sample["audio"], dtype=torch.float32)
        elif path.is_dir():
            for file in audio_files(path):
                yield from audio_file(file, sample_rate, skipped)
        else:
            yield from audio_file(path, sample_rate, skipped)


def audio_file(path: Path, sample_rate: int, skipped: list[str]) -> Iterator[tuple[str, Tensor]]:
    """One file decoded with soundfile, mixed to mono and resampled; an unusable file is listed in `skipped`."""
    try:
        for _, block, rate in read_segments(path):
            yield str(path), torch.from_numpy(convert(block, rate, sample_rate=sample_rate, channels=1)[:, 0].copy())
    except BadAudio as reason:
        skipped.append(f"{path}: {reason}")


class Embedder:
    """Windows of equal length from many files go through the backbone together; per-file sums are kept."""

    def __init__(self, backbone: Backbone, *, window: int, hop: int, batch_size: int, tokens: bool,
                 device: torch.device) -> None:
        self.backbone = backbone.to(device).eval()
        self.frontend = LogMel(config=backbone.config.frontend).to(device)
        self.window, self.hop, self.batch_size, self.tokens, self.device = window, hop, batch_size, tokens, device
        self.minimum = self.frontend.config.window_length + (backbone.config.patch_size - 1) * self.frontend.config.hop_length
        self.pending: dict[int, list[tuple[int, Tensor]]] = defaultdict(list)  # length -> [(file index, window)]
        self.sums: dict[int, list] = {}  # file index -> [embedding sum, token sum, windows, grid]

    def add(self, index: int, waveform: Tensor) -> None:
        if waveform.numel() < self.minimum:  # shorter than one patch: pad with silence to one patch
            waveform = torch.nn.functional.pad(waveform, (0, self.minimum - waveform.numel()))
        for start in window_starts(waveform.numel(), self.window, self.hop):
            piece = waveform[start: start + self.window]
            self.pending[piece.numel()].append((index, piece))
            if len(self.pending[piece.numel()]) == self.batch_size:
                self.flush(piece.numel())

    @torch.inference_mode()
    def flush(self, length: int) -> None:
        batch = self.pending.pop(length, [])
        if not batch:
            return
        audio = torch.stack([piece for _, piece in batch]).to(self.device)
        features = self.frontend(audio)
        output = self.backbone(features)
        grid = self.backbone.grid(features.shape[1])
        for row, (index, _) in enumerate(batch):
            tokens = output.tokens[row].float().cpu() if self.tokens else None
            if index not in self.sums:
                self.sums[index] = [output.embedding[row].float().cpu(), tokens, 1, grid]
            else:
                entry = self.sums[index]
                entry[0] += output.embedding[row].float().cpu()
                if self.tokens:
                    entry[1] += tokens
                entry[2] += 1

    def finish(self) -> list[list]:
        for length in list(self.pending):
            self.flush(length)
        return [self.sums[index] for index in sorted(self.sums)]


def embed(backbone: Backbone, paths: list[str], *, window_seconds: float | None = None,
          hop_seconds: float | None = None, batch_size: int = 16, tokens: bool = False,
          device: str | torch.device = "cpu", progress: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the .npz (see the module docstring) and the list of skipped files with reasons."""
    frontend = backbone.config.frontend
    clip = (backbone.config.max_frames - 1) * frontend.hop_length + frontend.window_length
    window = clip if window_seconds is None else int(round(window_seconds * frontend.sample_rate))
    hop = window if hop_seconds is None else int(round(hop_seconds * frontend.sample_rate))
    if window > clip or window <= 0 or hop <= 0:
        raise UserError(f"--window-seconds must be in (0, {clip / frontend.sample_rate:.3f}] (the backbone's longest "
                        "input) and --hop-seconds positive")
    embedder = Embedder(backbone, window=window, hop=hop, batch_size=batch_size, tokens=tokens,
                        device=torch.device(device))
    keys: list[str] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for key, waveform in progress_bar(inputs(paths, frontend.sample_rate, skipped), desc="embed", unit="clip",
                                      enabled=progress):
        if key in seen:
            raise UserError(f"{key}: given twice; each file or shard sample may appear once")
        seen.add(key)
        embedder.add(len(keys), waveform)
        keys.append(key)
    if not keys:
        raise UserError(f"{' '.join(paths)}: nothing to embed ({len(skipped)} unusable files)")
    results = embedder.finish()
    counts = np.array([entry[2] for entry in results], dtype=np.int64)
    arrays = {
        "keys": np.array(keys, dtype=np.str_),
        "embeddings": np.stack([(entry[0] / entry[2]).numpy() for entry in results]).astype(np.float32),
        "windows": counts,
    }
    if tokens:
        token_means = [(entry[1] / entry[2]).numpy() for entry in results]
        arrays["tokens"] = np.concatenate(token_means).astype(np.float32)
        arrays["token_offsets"] = np.concatenate([[0], np.cumsum([len(t) for t in token_means])]).astype(np.int64)
        arrays["token_grids"] = np.array([entry[3] for entry in results], dtype=np.int64)
    return arrays, skipped


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m pretrain embed",
                            description="Clip embeddings of audio files or shards, keyed by file.")
    parser.add_argument("backbone", help="backbone folder or Hub id (Timbre export or any AST checkpoint)")
    parser.add_argument("inputs", nargs="+", help="audio files, folders of audio, shard files or shard folders")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--tokens", action="store_true", help="also store the window-averaged patch tokens")
    parser.add_argument("--window-seconds", type=positive_float, default=None, help="window length (default: the backbone's clip)")
    parser.add_argument("--hop-seconds", type=positive_float, default=None, help="window hop (default: the window length)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        raise UserError(f"{args.out}: the output must be a .npz file; name it e.g. embeddings.npz")
    out = output_file(args.out)
    backbone = load_backbone(args.backbone)
    arrays, skipped = embed(backbone, args.inputs, window_seconds=args.window_seconds, hop_seconds=args.hop_seconds,
                            batch_size=args.batch_size, tokens=args.tokens, device=args.device,
                            progress=True)
    partial = out.with_name(f".{out.stem}.partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, out)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"embedded {len(arrays['keys'])} clips ({int(arrays['windows'].sum())} windows), skipped {len(skipped)} "
          f"unusable files -> {out}", file=sys.stderr)
    return 1 if skipped else 0
