"""Windowed inference over whole files of any length.

Inference cuts every file into windows of the training clip length with a hop (the last window is aligned to the end of
the file; files shorter than one window are zero-padded, as the training loader pads short clips), runs the windows of
many files together in batches, and aggregates window probabilities per file (mean or max).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from core.errors import positive_float, positive_int
from core.trainer import PRECISION_CHOICES, PRECISIONS
from finetune.folder import FinetunedModel
from pretrain.encoder import cut_windows

Aggregate = Literal["mean", "max"]  # window probabilities -> file probabilities
AGGREGATES = get_args(Aggregate)


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The windowing, batching and precision options that `evaluate` and `predict` share."""
    parser.add_argument("--aggregate", choices=AGGREGATES, default=None, help="window -> file (default: the model's)")
    parser.add_argument("--hop-seconds", type=positive_float, default=None, help="window hop (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                        help="inference precision: bf16 on CPUs with AVX512-BF16 and recent GPUs, fp16 on GPUs; auto: "
                        "bf16 where the device multiplies it natively, else fp32")


@dataclass
class FileResult:
    """Window-level outputs of one file."""

    probabilities: np.ndarray  # (windows, classes)
    embeddings: np.ndarray  # (windows, D)
    starts: list[float]  # seconds
    duration: float  # seconds

    def aggregate(self, how: str = "mean") -> np.ndarray:
        """(classes,) file-level probabilities."""
        return aggregate_windows(self.probabilities, how)


def aggregate_windows(probabilities: np.ndarray, how: str) -> np.ndarray:
    """(windows, classes) -> (classes,): the mean or the max over windows."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {how!r}")
    return probabilities.mean(axis=0) if how == "mean" else probabilities.max(axis=0)


@torch.inference_mode()
def infer(model: FinetunedModel, files: Iterable[tuple[Any, Tensor]], *, hop_seconds: float | None = None,
          batch_size: int = 32) -> Iterator[tuple[Any, FileResult]]:
    """(item, mono audio at the model's rate) -> (item, FileResult), windows of many files batched together.

    Files come out in input order; at most about `batch_size` windows plus one file's windows are held at a time.
    """
    window, hop = model.window, model.hop(hop_seconds)
    pending: list[tuple[Any, Tensor, list[int], float]] = []
    count = 0
    for item, audio in files:
        windows, starts = cut_windows(audio, window, hop)
        pending.append((item, windows, starts, audio.shape[-1] / model.info.sample_rate))
        count += len(starts)
        if count >= batch_size:
            yield from _run(model, pending, batch_size)
            pending, count = [], 0
    yield from _run(model, pending, batch_size)


def _run(model: FinetunedModel, pending: list, batch_size: int) -> Iterator[tuple[Any, FileResult]]:
    if not pending:
        return
    windows = torch.cat([entry[1] for entry in pending])
    probabilities, embeddings = [], []
    dtype = PRECISIONS[model.precision]
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
        for chunk in windows.split(batch_size):
            p, e = model.classifier.predict(chunk.to(model.device))
            probabilities.append(p.cpu())
            embeddings.append(e.cpu())
    probabilities = torch.cat(probabilities).numpy()
    embeddings = torch.cat(embeddings).numpy()
    offset = 0
    rate = model.info.sample_rate
    for item, file_windows, starts, duration in pending:
        end = offset + len(starts)
        yield item, FileResult(probabilities=probabilities[offset:end], embeddings=embeddings[offset:end],
                               starts=[start / rate for start in starts], duration=duration)
        offset = end
