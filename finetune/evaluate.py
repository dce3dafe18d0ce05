"""`python -m finetune evaluate MODEL DATA` and `python -m finetune plot-embeddings MODEL DATA --out FILE.png`.

DATA is an IRMAS test folder (parsed by `shards.sources` as `irmas-test`) or test shards. Whole files are cut into
windows of the training clip length (see `finetune.inference.infer`), and the model's thresholds decide presence from the
per-file aggregate. Metrics are reported per file (what IRMAS publications report) and per window (each window carries
its file's labels).

Several models evaluate as one ensemble (they share labels, sample rate, clip length and hop, so they cut the same
windows): each file's probabilities are the mean of the models' file probabilities, each window's the mean of the
models' window probabilities, and each instrument's threshold the mean of the models' thresholds. A file is averaged
after each model's aggregate, not before, because each model's thresholds were tuned on its own file scores: under
`max`, the loudest window of the mean falls below the mean of the loudest windows and under the mean thresholds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ArgumentParser, UserError, output_file, output_folder
from core.progress import progress_bar
from finetune.folder import FinetunedModel, load_model
from finetune.inference import AGGREGATES, FileResult, add_inference_options, infer
from finetune.metrics import REPORTED, multilabel_metrics
from shards.inputs import labelled_examples
from shards.vocab import GENRE_NAMES, GENRES, INSTRUMENT_NAMES, multi_hot


@dataclass
class Item:
    """One evaluation file: where it came from and what it is labelled."""

    name: str
    instruments: list[str]
    genre: int  # index into shards.vocab.GENRES, -1 unknown


def load_data(data: str, *, sample_rate: int, skipped: list[dict]) -> Iterator[tuple[Item, "np.ndarray"]]:
    """(Item, mono audio at `sample_rate`) for every usable file; unusable ones are appended to `skipped`."""
    for example in labelled_examples(data, sample_rate=sample_rate, skipped=skipped):
        yield Item(name=example.path or example.key, instruments=example.instruments, genre=example.genre), example.audio


def run_model(model: FinetunedModel, data: str, *, hop_seconds: float | None, batch_size: int,
              skipped: list[dict]) -> list[tuple[Item, FileResult]]:
    results = infer(model, load_data(data, sample_rate=model.info.sample_rate, skipped=skipped),
                    hop_seconds=hop_seconds, batch_size=batch_size)
    return list(progress_bar(results, desc="evaluate", unit=" files", leave=False))


def ensemble_settings(models: list[FinetunedModel], *, aggregate: str | None,
                      hop_seconds: float | None) -> tuple[str, float]:
    """The aggregate and hop (seconds) the models share; a one-line error names the first model that differs."""
    first = models[0]
    shared = {"labels": lambda m: m.info.labels, "sample rate": lambda m: m.info.sample_rate,
              "clip length": lambda m: m.info.clip_seconds,
              "window hop": lambda m: m.hop(hop_seconds) / m.info.sample_rate}
    if aggregate is None:
        shared["aggregate"] = lambda m: m.info.aggregate
    for model in models[1:]:
        for what, value in shared.items():
            if value(model) != value(first):
                fix = {"window hop": "pass --hop-seconds", "aggregate": "pass --aggregate mean or max"}.get(
                    what, "ensemble models fine-tuned on the same labels and clips")
                raise UserError(f"{model.path}: its {what} ({value(model)}) differs from {first.path}'s "
                                f"({value(first)}); {fix}")
    return aggregate or first.info.aggregate, hop_seconds or first.info.hop_seconds


def evaluate(models: FinetunedModel | list[FinetunedModel], data: str, *, out: Path, aggregate: str | None = None,
             hop_seconds: float | None = None, batch_size: int = 32) -> dict:
    """Run, score, and write report.json, report.md, predictions.jsonl and the plots under `out`; returns the report.

    Several `models` are scored as their ensemble (see the module docstring).
    """
    models = [models] if isinstance(models, FinetunedModel) else list(models)
    aggregate, hop_seconds = ensemble_settings(models, aggregate=aggregate, hop_seconds=hop_seconds)
    if aggregate not in AGGREGATES:
        raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
    skipped: list[dict] = []
    runs = [run_model(model, data, hop_seconds=hop_seconds, batch_size=batch_size, skipped=skipped if i == 0 else [])
            for i, model in enumerate(models)]
    if not runs[0]:
        raise UserError(f"{data}: none of the files could be read ({len(skipped)} skipped); see the reasons with "
                        f"`python -m shards pack irmas-test {data} OUTDIR`")
    items = [item for item, _ in runs[0]]
    # per file, (windows, classes) and (classes,) averaged over the models
    windows = [np.mean([results[f][1].probabilities for results in runs], axis=0) for f in range(len(items))]
    probabilities = np.mean([[result.aggregate(aggregate) for _, result in results] for results in runs], axis=0)
    labels = models[0].info.labels
    thresholds = np.mean([model.info.thresholds for model in models], axis=0)
    targets = np.stack([multi_hot(item.instruments) for item in items])
    chunk_probabilities = np.concatenate(windows)
    chunk_targets = np.concatenate([np.repeat(target[None], len(window), axis=0)
                                    for target, window in zip(targets, windows)])
    file_metrics = multilabel_metrics(probabilities, targets, thresholds, labels)
    chunk_metrics = multilabel_metrics(chunk_probabilities, chunk_targets, thresholds, labels)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_report(file_metrics, chunk_metrics, probabilities, targets, thresholds, labels, out)
    report = {
        **file_metrics,
        "models": [model.path for model in models], "data": str(data), "aggregate": aggregate,
        "hop_seconds": hop_seconds, "clip_seconds": models[0].info.clip_seconds,
        "precision": models[0].precision, "files": len(items), "windows": int(len(chunk_targets)), "skipped": skipped,
        "chunk": chunk_metrics, "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report, labels))
    with open(out / "predictions.jsonl", "w") as handle:
        for item, window, probability in zip(items, windows, probabilities):
            predicted = [code for code, p, t in zip(labels, probability, thresholds) if p >= t]
            handle.write(json.dumps({"file": item.name, "true": item.instruments, "predicted": predicted,
                                     "probabilities": dict(zip(labels, map(float, probability))),
                                     "windows": len(window)}) + "\n")
    return report


def markdown(report: dict, labels: list[str]) -> str:
    def number(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    chunk = report["chunk"]
    lines = [
        "# Evaluation report", "",
        ("Model: " if len(report["models"]) == 1 else f"Ensemble of {len(report['models'])} models (mean file and "
         "window probabilities, mean thresholds): ") + ", ".join(f"`{path}`" for path in report["models"]), "",
        f"Data: `{report['data']}`: {report['files']} files, {report['windows']} windows of "
        f"{report['clip_seconds']:g} s every {report['hop_seconds']:g} s, aggregated by `{report['aggregate']}`; "
        f"{len(report['skipped'])} skipped.", "",
        "| metric | file level | window level |", "|---|---|---|",
        *(f"| {name} | {number(report[name])} | {number(chunk[name])} |" for name in REPORTED),
        "",
        "macro F1 and mAP average over the instruments present in the data; hamming score is the per-file "
        "|true ∩ predicted| / |true ∪ predicted|; exact match needs every instrument right.", "",
        "## Per instrument (file level)", "",
        "| instrument | precision | recall | F1 | AP | ROC-AUC | support | predicted | threshold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for code in labels:
        row = report["per_instrument"][code]
        lines.append(f"| {code} ({INSTRUMENT_NAMES[code]}) | {number(row['precision'])} | {number(row['recall'])} | "
                     f"{number(row['f1'])} | {number(row['average_precision'])} | {number(row['roc_auc'])} | "
                     f"{row['support']} | {row['predicted']} | {row['threshold']:.3f} |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{s['path']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def plot_report(file_metrics: dict, chunk_metrics: dict, probabilities: np.ndarray, targets: np.ndarray,
                thresholds: np.ndarray, labels: list[str], out: Path) -> list[str]:
    """Per-instrument F1 bars, ROC curves and the label co-occurrence / true-vs-predicted matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    x = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.bar(x - 0.2, [file_metrics["per_instrument"][c]["f1"] for c in labels], 0.4, label="file")
    axis.bar(x + 0.2, [chunk_metrics["per_instrument"][c]["f1"] for c in labels], 0.4, label="window")
    axis.set_xticks(x, labels)
    axis.set_ylim(0, 1)
    axis.set_ylabel("F1")
    axis.set_title(f"Per-instrument F1 (file macro {file_metrics['macro_f1']:.3f}, micro {file_metrics['micro_f1']:.3f})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "f1_per_instrument.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 6))
    for c, code in enumerate(labels):
        if 0 < targets[:, c].sum() < len(targets):
            fpr, tpr, _ = roc_curve(targets[:, c], probabilities[:, c])
            auc = file_metrics["per_instrument"][code]["roc_auc"]
            axis.plot(fpr, tpr, label=f"{code} ({auc:.2f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("ROC per instrument (file level)")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "roc_curves.png", dpi=100)
    plt.close(figure)

    predictions = (probabilities >= thresholds).astype(int)
    matrices = {"true label co-occurrence": targets.T @ targets,
                "true (rows) vs predicted (columns)": targets.T @ predictions}
    figure, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for axis, (title, matrix) in zip(axes, matrices.items()):
        image = axis.imshow(matrix, cmap="viridis")
        for i in range(len(labels)):
            for j in range(len(labels)):
                axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                          color="k" if matrix[i, j] > matrix.max() / 2 else "w")
        axis.set_xticks(x, labels, rotation=90)
        axis.set_yticks(x, labels)
        axis.set_title(title)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(out / "label_matrix.png", dpi=100)
    plt.close(figure)
    return ["f1_per_instrument.png", "roc_curves.png", "label_matrix.png"]


def embed_plot(model: FinetunedModel, data: str, out: Path, *, method: str = "tsne", batch_size: int = 32) -> int:
    """2-D map of per-file embeddings (mean over windows), coloured by instrument and by genre; returns the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    results = run_model(model, data, hop_seconds=None, batch_size=batch_size, skipped=[])
    if len(results) < 3:
        raise UserError(f"{data}: {len(results)} readable files; a map needs at least 3")
    embeddings = np.stack([result.embeddings.mean(axis=0) for _, result in results])
    if method == "tsne":
        perplexity = min(30.0, (len(embeddings) - 1) / 3)
        points = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(embeddings)
    elif method == "pca":
        points = PCA(n_components=2).fit_transform(embeddings)
    else:
        raise UserError(f"--method must be tsne or pca; got {method!r}")
    instrument = [item.instruments[0] if len(item.instruments) == 1 else "several" if item.instruments else "none"
                  for item, _ in results]
    genre = [GENRE_NAMES[GENRES[item.genre]] if item.genre >= 0 else "unknown" for item, _ in results]
    figure, axes = plt.subplots(1, 2, figsize=(13, 6))
    for axis, (title, colours) in zip(axes, {"instrument": instrument, "genre": genre}.items()):
        for value in sorted(set(colours)):
            mask = np.array([c == value for c in colours])
            label = f"{value} ({INSTRUMENT_NAMES[value]})" if value in INSTRUMENT_NAMES else value
            axis.scatter(points[mask, 0], points[mask, 1], s=14, label=label,
                         color="lightgrey" if value in ("several", "unknown", "none") else None)
        axis.set_title(f"{method.upper()} of clip embeddings by {title}")
        axis.legend(fontsize=7, markerscale=1.5)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return len(results)


def main(argv: list[str]) -> int:
    """Evaluate a fine-tuned model on whole files."""
    parser = ArgumentParser(prog="python -m finetune evaluate", description=main.__doc__)
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="model folder (<output_dir>/model of a fine-tuning run); several: score their ensemble")
    parser.add_argument("data", help="IRMAS test folder or test shard directory/URLs")
    parser.add_argument("--out", default=None, help="report folder (default: <model>/../report; needed for an ensemble)")
    add_inference_options(parser)
    args = parser.parse_args(argv)
    if args.out is None and len(args.models) > 1:
        raise UserError(f"an ensemble of {len(args.models)} models has no folder of its own; pass --out REPORT_DIR")
    out = output_folder(args.out if args.out else Path(args.models[0]).parent / "report")  # checked before the work
    models = [load_model(path, precision=args.precision) for path in args.models]
    report = evaluate(models, args.data, out=out, aggregate=args.aggregate, hop_seconds=args.hop_seconds,
                      batch_size=args.batch_size)
    numbers = "  ".join(f"{name} {report[name]:.3f}" for name in REPORTED if report[name] is not None)
    print(f"{report['files']} files ({report['windows']} windows, {len(report['skipped'])} skipped): {numbers}")
    print(f"report: {out / 'report.md'}  ({out / 'report.json'}; plots: {', '.join(report['plots'])})")
    return 0


def plot_embeddings_main(argv: list[str]) -> int:
    """Map clip embeddings of a fine-tuned model in 2-D, coloured by instrument and by genre."""
    parser = ArgumentParser(prog="python -m finetune plot-embeddings", description=plot_embeddings_main.__doc__)
    parser.add_argument("model", help="model folder (<output_dir>/model of a fine-tuning run)")
    parser.add_argument("data", help="IRMAS test folder or shard directory/URLs (shards carry genres)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--method", choices=("tsne", "pca"), default="tsne")
    args = parser.parse_args(argv)
    out = output_file(args.out)
    count = embed_plot(load_model(args.model), args.data, out, method=args.method)
    print(f"{count} files mapped: {args.out}", file=sys.stderr)
    return 0
