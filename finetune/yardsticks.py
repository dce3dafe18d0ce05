"""Yardsticks without a ViT, scored like the fine-tuned models: is a model's test score evidence that it learned?

- *no information*: what a model that knows nothing reaches. Its F1 scores predict all 11 instruments on every file
  (what thresholds alone can buy); its LRAP is the mean over 100 seeded draws of random scores.
- *log-mel statistics + logistic regression*: one logistic regression per instrument on the mean and standard
  deviation of each mel bin over a window (the backbones' own frontend), window probabilities aggregated per file as
  the model's are (mean or max), thresholds tuned on the same validation sets as the model's (mixtures of clips,
  `shards.loader.validation_mixtures`, and/or whole files, `shards.loader.validation_files`).

    python -m finetune yardsticks TRAIN_SHARDS VAL_SHARDS TEST_SHARDS [--report REPORT.json] [--out yardsticks.json]

With `--report` (the report.json of `python -m finetune evaluate` on the same test data) the model's scores are
printed first, in the same table, and the regression aggregates windows as that report did and tunes its thresholds
on the validation sets the model's were tuned on (`--aggregate` and `--thresholds` override).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from core.errors import ArgumentParser, UserError, output_file, positive_float
from finetune.inference import AGGREGATES, aggregate_windows
from finetune.metrics import HEADLINE, multilabel_metrics, tune_thresholds
from finetune.train import THRESHOLD_SOURCES
from pretrain.encoder import cut_windows
from pretrain.frontend import LogMel
from shards.loader import eval_samples, validation_files, validation_mixtures
from shards.vocab import INSTRUMENTS

NO_INFORMATION = "no information"
REGRESSION = "log-mel statistics + logistic regression"


@torch.inference_mode()
def _features(examples, frontend: LogMel, window: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per file: (windows, 2 * mels) mean and std of the log-mel features of each half-overlapping window."""
    features, targets = [], []
    for target, audio in examples:
        log_mel = frontend(cut_windows(audio, window, window // 2)[0])  # (windows, frames, mels)
        features.append(torch.cat([log_mel.mean(dim=1), log_mel.std(dim=1)], dim=1).numpy())
        targets.append(target)
    if not features:
        raise UserError("yardsticks: no labelled samples to score; pass IRMAS-layout shards with labels")
    return features, np.stack(targets)


def _samples(spec: str | Path, sample_rate: int) -> list[dict]:
    return [s for s in eval_samples(spec, rank=0, world_size=1, sample_rate=sample_rate) if s["labelled"]]


def yardsticks(train: str | Path, val: str | Path, test: str | Path, *, clip_seconds: float = 3.0,
               aggregate: str = "mean", thresholds: Sequence[str] = ("mixtures",),
               seed: int = 0) -> dict[str, dict[str, float]]:
    """{yardstick: {metric: value}} on the test data, for the two yardsticks of the module docstring; the
    regression's thresholds are tuned on the validation sets named in `thresholds` (THRESHOLD_SOURCES), pooled."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import label_ranking_average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frontend = LogMel()
    rate = frontend.config.sample_rate
    window = round(clip_seconds * rate)
    train_x, train_y = _features(((s["targets"].numpy(), s["audio"]) for s in _samples(train, rate)), frontend, window)
    val_samples = _samples(val, rate)
    builders = {"clips": lambda: val_samples,
                "mixtures": lambda: validation_mixtures(val_samples, seed=seed),
                "files": lambda: validation_files(val_samples, seed=seed)}
    chosen = [sample for name in thresholds for sample in builders[name]()]
    val_x, val_y = _features(((s["targets"].numpy(), s["audio"]) for s in chosen), frontend, window)
    test_x, test_y = _features(((s["targets"].numpy(), s["audio"]) for s in _samples(test, rate)), frontend, window)

    per_window_y = np.concatenate([np.repeat(y[None], len(x), axis=0) for x, y in zip(train_x, train_y)])
    regression = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000)))

    def probabilities(features: list[np.ndarray]) -> np.ndarray:
        return np.stack([aggregate_windows(regression.predict_proba(x), aggregate) for x in features])

    # 2 x mels features: BLAS threads only spin against torch's OpenMP threads here (measured 10-20x slower, 2 cores)
    with threadpool_limits(limits=1, user_api="blas"):
        regression.fit(np.concatenate(train_x), per_window_y)
        test_p, val_p = probabilities(test_x), probabilities(val_x)

    labels = list(INSTRUMENTS)
    regressed = multilabel_metrics(test_p, test_y, tune_thresholds(val_p, val_y), labels)
    always = multilabel_metrics(np.ones(test_y.shape), test_y, np.zeros(len(labels)), labels)
    draws = np.random.default_rng(seed).random((100, *test_y.shape))
    chance = float(np.mean([label_ranking_average_precision_score(test_y, draw) for draw in draws]))
    chance_map = multilabel_metrics(draws[0], test_y, np.zeros(len(labels)), labels)["map"]
    return {NO_INFORMATION: {"macro_f1": always["macro_f1"], "micro_f1": always["micro_f1"], "lrap": chance,
                             "map": chance_map},
            REGRESSION: {key: regressed[key] for key in HEADLINE}}


def _thresholds_from(model: str | None) -> list[str] | None:
    """The validation sets a fine-tuned model folder's thresholds were tuned on, when it says."""
    try:
        named = json.loads((Path(model) / "finetune.json").read_text())["validation"]["thresholds_from"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    sets = named.split("+")
    return sets if set(sets) <= set(THRESHOLD_SOURCES) else None


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m finetune yardsticks", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", help="labelled training shards (e.g. demo/shards/irmas-train/train)")
    parser.add_argument("val", help="validation shards, for the thresholds (e.g. demo/shards/irmas-train/val)")
    parser.add_argument("test", help="test shards (e.g. demo/shards/irmas-test/test)")
    parser.add_argument("--clip-seconds", type=positive_float, default=3.0, help="window length (default 3.0)")
    parser.add_argument("--report", default=None, help="report.json of `finetune evaluate` on TEST, shown first")
    parser.add_argument("--aggregate", choices=AGGREGATES, default=None,
                        help="window -> file for the regression (default: the --report's, else mean)")
    parser.add_argument("--thresholds", nargs="+", choices=THRESHOLD_SOURCES, default=None,
                        help="validation sets, pooled, that tune the regression's thresholds (default: the --report "
                             "model's, else mixtures)")
    parser.add_argument("--out", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    rows, aggregate, thresholds = {}, args.aggregate, args.thresholds
    if args.report:
        try:
            report = json.loads(Path(args.report).read_text())
            rows["model (" + str(report.get("model", args.report)) + ")"] = {key: report[key] for key in HEADLINE}
            aggregate = aggregate or report["aggregate"]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"--report {args.report}: not a report.json of `python -m finetune evaluate` ({error}); "
                            "pass <out>/report.json of an evaluate run") from None
        thresholds = thresholds or _thresholds_from(report.get("model"))
    out = output_file(args.out) if args.out else None
    scores = yardsticks(args.train, args.val, args.test, clip_seconds=args.clip_seconds, aggregate=aggregate or "mean",
                        thresholds=thresholds or ["mixtures"])
    if out:
        out.write_text(json.dumps(scores, indent=1) + "\n")
    rows |= scores
    width = max(map(len, rows))
    print(f"{'test scores':<{width}}  " + "  ".join(f"{key:>8}" for key in HEADLINE))
    for name, values in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{values[key]:8.3f}" for key in HEADLINE))
    return 0
