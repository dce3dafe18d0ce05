"""Multi-label losses: BCE with per-class `pos_weight`, sigmoid focal loss, asymmetric loss, label smoothing.

IRMAS-train is imbalanced (voice and guitars dominate), so `pos_weight` = negatives / positives per class, counted on
the training labels, keeps rare instruments from being predicted absent by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from shards.loader import sample_metadata
from shards.vocab import multi_hot


Kind = Literal["bce", "focal", "asl"]
LOSSES = get_args(Kind)


@dataclass
class LossConfig:
    kind: Kind = "bce"
    pos_weight: bool = True  # per-class negatives/positives from the training labels
    max_pos_weight: float = 10.0
    focal_gamma: float = 2.0
    # asl (Ridnik et al. 2021): focusing exponents apart for positives and negatives, and negatives whose probability
    # is below asl_clip give no loss (the paper's defaults)
    asl_gamma_positive: float = 0.0
    asl_gamma_negative: float = 4.0
    asl_clip: float = 0.05
    label_smoothing: float = 0.0  # targets move eps/2 towards the other side


def label_counts(spec) -> tuple[np.ndarray, int]:
    """(positives per instrument, number of samples) from the shards' json metadata, without decoding audio."""
    # every process counts every shard, so all ranks get the same pos_weight
    counts = np.zeros_like(multi_hot([]))
    total = 0
    for metadata in sample_metadata(spec):
        counts += multi_hot(metadata.get("instruments") or [])
        total += 1
    return counts, total


def pos_weight_from_counts(counts: np.ndarray, total: int, *, maximum: float) -> Tensor:
    """negatives / positives per class, clipped to [1/maximum, maximum]; classes never seen get `maximum`."""
    positives = torch.as_tensor(counts, dtype=torch.float32)
    weight = (total - positives) / positives.clamp_min(1.0)
    weight = torch.where(positives > 0, weight, torch.tensor(maximum))
    return weight.clamp(1 / maximum, maximum)


class MultiLabelLoss(torch.nn.Module):
    """logits (B, C), targets (B, C) in [0, 1] -> scalar loss."""

    def __init__(self, *, config: LossConfig, pos_weight: Tensor | None = None):
        super().__init__()
        if config.kind not in LOSSES:
            raise ValueError(f"loss.kind must be one of {', '.join(LOSSES)}; got {config.kind!r}")
        self.config = config
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """`weights` (B,) e.g. 0 for unlabelled clips, which have no negatives to learn from either."""
        logits = logits.float()
        eps = self.config.label_smoothing
        targets = targets * (1 - eps) + eps / 2
        if self.config.kind == "asl":
            loss = self.asymmetric(logits, targets)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight,
                                                                        reduction="none")
        if self.config.kind == "focal":
            probability = torch.sigmoid(logits)
            p_true = probability * targets + (1 - probability) * (1 - targets)
            loss = loss * (1 - p_true).pow(self.config.focal_gamma)
        if weights is None:
            return loss.mean()
        weights = weights.float()
        return (loss.mean(dim=1) * weights).sum() / weights.sum().clamp_min(1.0)

    def asymmetric(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(B, C) per-element asymmetric loss: -t (1-p)^g+ log p - (1-t) q^g- log(1-q), q = max(p - clip, 0)."""
        config = self.config
        probability = torch.sigmoid(logits)
        shifted = (probability - config.asl_clip).clamp_min(0.0)
        positive = (1 - probability).pow(config.asl_gamma_positive) * torch.nn.functional.logsigmoid(logits)
        if self.pos_weight is not None:
            positive = positive * self.pos_weight
        negative = shifted.pow(config.asl_gamma_negative) * torch.log((1 - shifted).clamp_min(1e-8))
        return -(targets * positive + (1 - targets) * negative)


def view_agreement(logits: Tensor, target: Tensor, *, confidence: float = 0.0) -> Tensor:
    """How far one view's logits (B, C) are from the instrument probabilities `target` (B, C) that the model gave
    another view (computed without gradient). confidence 0: soft binary cross-entropy to the probabilities (the
    Pi-model). confidence c > 0.5: FixMatch's rule (Sohn et al. 2020) per instrument: hard targets where the other view
    is sure (probability >= c present, <= 1 - c absent), the rest ignored; averaged over all entries, so the term
    grows as the model grows sure."""
    if not confidence:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
    present = target >= confidence
    sure = present | (target <= 1 - confidence)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), present.float(), weight=sure.float())
