"""`python -m finetune calibrate MODEL DATA... --out NEW_MODEL [--match pooled|instrument]`: decision thresholds for a
new collection, from its audio alone (no labels).

A fine-tune tunes its thresholds on validation audio that sounds like its labels. Where a collection sounds different
(another source, studio or SoundFont) the scores shift and those thresholds cut in the wrong place: on a SoundFont the
labels never showed, the scores shrink and the tuned thresholds lose about 0.1 macro F1 (bench/quality_notes.md).
Calibration scores the collection and moves each threshold to the same share of its scores as it cut on validation
(`finetune.metrics.positive_rates`, stored in finetune.json at export):

- `pooled` (default): one map for every instrument: each threshold moves to the quantile of the collection's scores
  (all instruments together) at which it sat among the validation scores. It assumes only that the collection's files
  hold about as many instruments as the validation examples did, in any mix.
- `instrument`: each instrument flags the share of the collection's files that it flagged of the validation
  examples. It also assumes that each instrument is about as common in the collection as in validation (whose
  mixtures are balanced): use it for a collection with a similar mix of instruments.

Only the thresholds change; scores, and so LRAP and mAP, do not. The model folder is copied to --out with the new
thresholds, and finetune.json records the calibration. The collection should be large enough for quantiles (at least
MIN_FILES files) and be the kind of audio the model will be asked about.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from core.errors import ArgumentParser, UserError
from core.progress import progress_bar
from finetune.folder import FinetunedModel, load_model
from finetune.inference import add_inference_options
from finetune.predict import entries, input_count, predict
from shards.inputs import expand

MATCHES = ("pooled", "instrument")
MIN_FILES = 20


def calibrated_thresholds(scores: np.ndarray, validation: dict, match: str) -> np.ndarray:
    """(C,) thresholds that cut the collection's (N, C) file scores at the shares the validation thresholds cut."""
    rates = validation["pooled_rates" if match == "pooled" else "positive_rates"]
    thresholds = []
    for k, rate in enumerate(rates):
        values = scores.ravel() if match == "pooled" else scores[:, k]
        thresholds.append(np.nextafter(values.max(), np.inf) if rate <= 0 else np.quantile(values, 1 - rate))
    return np.array(thresholds, dtype=np.float64)


def collection_scores(model: FinetunedModel, data: list[str], *, aggregate: str | None, hop_seconds: float | None,
                      batch_size: int, progress: bool = True) -> tuple[np.ndarray, int]:
    """(N, C) file-level probabilities of every readable file or shard sample in `data`, and how many failed."""
    named = list(expand(data))
    bar = progress_bar(total=input_count(named), desc="calibrate", unit="file", enabled=progress)
    scores, failed = [], 0
    for answer in predict(model, entries(named, model.info.sample_rate), aggregate=aggregate, hop_seconds=hop_seconds,
                          batch_size=batch_size):
        bar.update()
        if "error" in answer:
            failed += 1
        else:
            scores.append([answer["probabilities"][code] for code in model.info.labels])
    bar.close()
    return np.array(scores, dtype=np.float64).reshape(-1, len(model.info.labels)), failed


def calibrate(model_dir: str | os.PathLike, data: list[str], out: str | os.PathLike, *, match: str = "pooled",
              aggregate: str | None = None, hop_seconds: float | None = None, batch_size: int = 32,
              precision: str = "fp32", progress: bool = True) -> dict:
    """Copy the model folder to `out` with thresholds calibrated on `data`; returns the calibration record."""
    model_dir, out = Path(model_dir), Path(out)
    if match not in MATCHES:
        raise UserError(f"--match {match}: choose one of {', '.join(MATCHES)}")
    if out.exists():
        raise UserError(f"{out}: exists; pass a new folder to --out (calibration never overwrites a model)")
    model = load_model(model_dir, precision=precision)
    validation = model.info.validation
    if "pooled_rates" not in validation:
        raise UserError(f"{model_dir / 'finetune.json'}: records no validation rates to calibrate against (fine-tuned "
                        "without data.val, or by a Timbre older than `finetune calibrate`); fine-tune it again with "
                        "data.val")
    scores, failed = collection_scores(model, data, aggregate=aggregate, hop_seconds=hop_seconds,
                                       batch_size=batch_size, progress=progress)
    if len(scores) < MIN_FILES:
        raise UserError(f"{' '.join(data)}: {len(scores)} readable files ({failed} unreadable); calibration needs at "
                        f"least {MIN_FILES} files of the collection to estimate its score quantiles")
    thresholds = calibrated_thresholds(scores, validation, match)
    record = {"match": match, "data": list(data), "files": len(scores), "unreadable": failed,
              "aggregate": aggregate or model.info.aggregate, "thresholds_before": list(model.info.thresholds)}
    temp = out.with_name(out.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    shutil.copytree(model_dir, temp)
    meta = json.loads((temp / "finetune.json").read_text())
    meta["thresholds"], meta["calibration"] = thresholds.tolist(), record
    (temp / "finetune.json").write_text(json.dumps(meta, indent=1) + "\n")
    (temp / "thresholds.json").write_text(json.dumps(dict(zip(meta["labels"], meta["thresholds"])), indent=1) + "\n")
    with open(temp / "README.md", "a") as card:
        card.write(f"\n## Calibration\n\nThe decision thresholds above were moved by `finetune calibrate` (match "
                   f"`{match}`) to {len(scores)} unlabeled files of {', '.join(data)}: "
                   + ", ".join(f"{code} {t:.3f}" for code, t in zip(meta["labels"], meta["thresholds"])) + ".\n")
    os.replace(temp, out)
    return record | {"thresholds": thresholds.tolist()}


def main(argv: list[str]) -> int:
    """Move a fine-tuned model's thresholds to a new collection's score scale, from the collection's audio alone."""
    parser = ArgumentParser(prog="python -m finetune calibrate", description=main.__doc__)
    parser.add_argument("model", help="model folder (<output_dir>/model of a fine-tuning run with data.val)")
    parser.add_argument("data", nargs="+", help="the collection: audio files, folders of them, or shards (labels, if "
                        f"any, are not read; at least {MIN_FILES} files)")
    parser.add_argument("--out", required=True, help="new model folder: a copy of MODEL with calibrated thresholds")
    parser.add_argument("--match", choices=MATCHES, default="pooled",
                        help="pooled (default): one score map for all instruments, assumes as many instruments per "
                        "file as in validation; instrument: each instrument's own, also assumes each instrument is "
                        "as common as in validation")
    add_inference_options(parser)
    args = parser.parse_args(argv)
    record = calibrate(args.model, args.data, args.out, match=args.match, aggregate=args.aggregate,
                       hop_seconds=args.hop_seconds, batch_size=args.batch_size, precision=args.precision)
    before, after = np.median(record["thresholds_before"]), np.median(record["thresholds"])
    print(f"{args.out}: thresholds calibrated on {record['files']} files ({record['unreadable']} unreadable), match "
          f"{record['match']}: median {before:.3f} -> {after:.3f}")
    return 0
