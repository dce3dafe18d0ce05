"""Multi-label metrics (scikit-learn) and per-instrument decision thresholds.

Thresholds are tuned on the validation split only: per instrument, the cut between two consecutive validation
probabilities that maximises that instrument's F1 (0.5 when the split has no positive of it).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    jaccard_score,
    label_ranking_average_precision_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

DEFAULT_THRESHOLD = 0.5

# The scores Timbre reports everywhere (validation lines, tracker, yardsticks, benchmarks), and the fuller set of a report.
HEADLINE = ("macro_f1", "micro_f1", "lrap", "map")
REPORTED = (*HEADLINE, "roc_auc", "hamming_score", "exact_match")


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, C) probabilities and 0/1 targets -> (C,) thresholds maximising each class's F1."""
    thresholds = np.full(probabilities.shape[1], DEFAULT_THRESHOLD)
    for c in range(probabilities.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0:
            continue
        order = np.argsort(-probabilities[:, c], kind="stable")
        p, t = probabilities[order, c], targets[order, c]
        true_positives = np.cumsum(t)  # predicting the top k+1 as positive
        k = np.arange(1, len(p) + 1)
        f1 = 2 * true_positives / (k + positives)
        distinct = np.append(p[:-1] > p[1:], True)  # only cut where the next probability is lower
        best = int(np.argmax(np.where(distinct, f1, -1)))
        thresholds[c] = (p[best] + p[best + 1]) / 2 if best + 1 < len(p) else p[best] / 2
    return thresholds


def positive_rates(probabilities: np.ndarray, thresholds: np.ndarray) -> dict[str, list[float]]:
    """Where each threshold cuts (N, C) scores: the share of the N examples it flags ("positive_rates") and the share of
    all N x C scores at or above it ("pooled_rates"). `finetune calibrate` moves thresholds to the same shares of a
    new collection's scores."""
    return {"positive_rates": (probabilities >= thresholds).mean(axis=0).tolist(),
            "pooled_rates": [float((probabilities >= t).mean()) for t in thresholds]}


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, thresholds: np.ndarray,
                       labels: list[str]) -> dict:
    """Headline and per-instrument metrics of thresholded predictions and of the ranking by probability."""
    targets = targets.astype(int)
    predictions = (probabilities >= thresholds).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, f1, support = precision_recall_fscore_support(targets, predictions, zero_division=0)
        present = targets.sum(axis=0) > 0
        both = present & (targets.sum(axis=0) < len(targets))
        per_instrument = {}
        for c, code in enumerate(labels):
            per_instrument[code] = {
                "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                "support": int(support[c]), "predicted": int(predictions[:, c].sum()), "threshold": float(thresholds[c]),
                "average_precision": float(average_precision_score(targets[:, c], probabilities[:, c]))
                if present[c] else None,
                "roc_auc": float(roc_auc_score(targets[:, c], probabilities[:, c])) if both[c] else None,
            }
        return {
            "count": int(len(targets)),
            "micro_f1": float(f1_score(targets, predictions, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(targets[:, present], predictions[:, present], average="macro", zero_division=0))
            if present.any() else 0.0,
            "micro_precision": float(precision_recall_fscore_support(targets, predictions, average="micro",
                                                                     zero_division=0)[0]),
            "micro_recall": float(precision_recall_fscore_support(targets, predictions, average="micro",
                                                                  zero_division=0)[1]),
            # hamming score: per-clip |true & predicted| / |true | predicted|, averaged (Godbole & Sarawagi)
            "hamming_score": float(jaccard_score(targets, predictions, average="samples", zero_division=1)),
            "hamming_loss": float(hamming_loss(targets, predictions)),
            "exact_match": float(accuracy_score(targets, predictions)),
            "lrap": float(label_ranking_average_precision_score(targets, probabilities)) if targets.any() else 0.0,
            "map": float(average_precision_score(targets[:, present], probabilities[:, present], average="macro"))
            if present.any() else 0.0,
            "roc_auc": float(roc_auc_score(targets[:, both], probabilities[:, both], average="macro"))
            if both.any() else None,
            "per_instrument": per_instrument,
        }
