"""`python -m pretrain embed BACKBONE AUDIO_OR_SHARDS... --out FILE.npz`: clip embeddings for downstream use.

Inputs are audio files, folders of audio files, or shards (a `.tar`, a split folder or a pack
OUTDIR). Each file or shard sample is cut into windows of the backbone's clip length (the last
window is aligned to the end, so every sample is seen; files shorter than a window are zero-padded
to one window, as in training: `pretrain.encoder.cut_windows`), and its embedding is the mean of its
windows' pooled embeddings.

The .npz holds `keys` (N,) — the file path, or the sample key for shards — `embeddings` (N, D)
float32 and `windows` (N,); with `--tokens` also the window-averaged patch tokens as one ragged
array: `tokens` (sum of K_i, D), `token_offsets` (N + 1,) and `token_grids` (N, 2) (frequency,
time patches), so file i's tokens are `tokens[token_offsets[i]:token_offsets[i + 1]]`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.errors import ArgumentParser, UserError, output_file, positive_float, positive_int
from core.progress import progress_bar
from pretrain.backbone import Backbone
from pretrain.encoder import AudioEncoder, cut_windows
from pretrain.hub import load_backbone
from shards.audio import BadAudio
from shards.inputs import expand, is_shards, read_mono, shard_examples


def inputs(paths: list[str], sample_rate: int, skipped: list[str]) -> Iterator[tuple[str, Tensor]]:
    """(key, mono waveform at sample_rate) for every audio file and shard sample named by `paths`."""
    for given in paths:
        if not is_shards(given) and not Path(given).exists():
            raise UserError(f"{given}: no such file or folder; pass audio files, folders of audio or shards")
    for name, shards in expand(paths):
        if shards:
            yield from ((example.key, example.audio) for example in shard_examples(name, sample_rate))
            continue
        try:
            yield name, read_mono(name, sample_rate)
        except BadAudio as reason:
            skipped.append(f"{name}: {reason}")


class Embedder:
    """Windows from many files go through the backbone together, `batch_size` at a time; per-file sums are kept."""

    def __init__(self, backbone: Backbone, *, window: int, hop: int, batch_size: int, tokens: bool,
                 device: torch.device) -> None:
        self.encoder = AudioEncoder(backbone=backbone).to(device).eval()
        self.window, self.hop, self.batch_size, self.tokens, self.device = window, hop, batch_size, tokens, device
        self.pending: list[tuple[int, Tensor]] = []  # (file index, window)
        self.sums: dict[int, list] = {}  # file index -> [embedding sum, token sum, windows, grid]

    def add(self, index: int, waveform: Tensor) -> None:
        for piece in cut_windows(waveform, self.window, self.hop)[0]:
            self.pending.append((index, piece))
            if len(self.pending) == self.batch_size:
                self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        features = self.encoder.features(torch.stack([piece for _, piece in batch]).to(self.device))
        output = self.encoder.backbone(features)
        grid = self.encoder.backbone.grid(features.shape[1])
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
        self.flush()
        return [self.sums[index] for index in sorted(self.sums)]


def embed(backbone: Backbone, paths: list[str], *, window_seconds: float | None = None,
          hop_seconds: float | None = None, batch_size: int = 16, tokens: bool = False,
          device: str | torch.device = "cpu", progress: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the .npz (see the module docstring) and the list of skipped files with reasons."""
    frontend = backbone.config.frontend
    clip = frontend.num_samples(backbone.config.max_frames)
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
