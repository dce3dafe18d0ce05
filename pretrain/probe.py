"""A cheap frozen-feature probe while pretraining: is the backbone's representation getting better for instruments?

At every checkpoint, the mean patch token of each labelled clip (frozen backbone, no augmentation) feeds one
logistic regression per instrument, fit on `probe.train` and scored on `probe.val` (LRAP, mAP, macro ROC AUC).
The clips are decoded once; a probe of a few hundred 3 s clips takes seconds on a CPU. The recipe's section:

    probe: {train: demo/shards/irmas-train/train, val: demo/shards/irmas-train/val}

Pretraining loss says how well the objective is solved; this says whether solving it helps the task.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score, roc_auc_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pretrain.embed import Embedder
from pretrain.encoder import AudioEncoder
from shards.loader import eval_samples


@dataclass
class ProbeConfig:
    """Labelled shards for the probe (both or neither); None turns it off."""

    train: list[str] | str | None = None
    val: list[str] | str | None = None
    max_clips: int = 2000  # per split, the first ones in shard order


def load_clips(spec: list[str] | str, *, sample_rate: int, max_clips: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Waveforms (samples,) and multi-hot targets (clips, instruments) of the first `max_clips` labelled clips."""
    audio, targets = [], []
    for sample in eval_samples(spec, rank=0, world_size=1, sample_rate=sample_rate):
        if not sample["labelled"]:
            continue
        audio.append(sample["audio"])
        targets.append(sample["targets"].numpy())
        if len(audio) == max_clips:
            break
    return audio, np.stack(targets) if targets else np.zeros((0, 0))


def embed_clips(encoder: AudioEncoder, clips: list[torch.Tensor]) -> np.ndarray:
    """(clips, hidden) mean patch token of each clip (log-mel -> backbone, no augmentation), averaged over its
    windows of the backbone's clip length, by `pretrain.embed.Embedder`; the backbone's train/eval mode is kept."""
    backbone, window = encoder.backbone, encoder.clip_samples
    was_training = backbone.training
    embedder = Embedder(backbone, window=window, hop=window, batch_size=64, tokens=True,
                        device=next(backbone.parameters()).device)
    for index, clip in enumerate(clips):
        embedder.add(index, clip)
    rows = embedder.finish()
    backbone.train(was_training)
    return torch.stack([tokens.mean(dim=0) / windows for _, tokens, windows, _ in rows]).numpy()


class Probe:
    """`Probe(config, sample_rate)(encoder)` -> {"probe_lrap", "probe_map", "probe_roc_auc"} on the val clips."""

    def __init__(self, config: ProbeConfig, *, sample_rate: int) -> None:
        self.train = load_clips(config.train, sample_rate=sample_rate, max_clips=config.max_clips)
        self.val = load_clips(config.val, sample_rate=sample_rate, max_clips=config.max_clips)

    def __call__(self, encoder: AudioEncoder) -> dict[str, float]:
        (train_audio, train_y), (val_audio, val_y) = self.train, self.val
        train_x, val_x = embed_clips(encoder, train_audio), embed_clips(encoder, val_audio)
        regression = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=500, C=0.1)))
        # one BLAS thread: at a few hundred features more only spin against torch's OpenMP threads (10-20x slower)
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            regression.fit(train_x, train_y)
            scores = regression.predict_proba(val_x)
        present = val_y.sum(axis=0) > 0
        return {"probe_lrap": float(label_ranking_average_precision_score(val_y, scores)),
                "probe_map": float(average_precision_score(val_y[:, present], scores[:, present], average="macro")),
                "probe_roc_auc": float(roc_auc_score(val_y[:, present], scores[:, present], average="macro"))}
