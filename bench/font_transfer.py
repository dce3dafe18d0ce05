"""How far fine-tuned models' instrument knowledge carries to each SoundFont of a synthetic unlabeled pool.

    python bench/font_transfer.py POOL_DIR POOL_SHARDS MODEL [MODEL ...] [--every 1]

POOL_DIR is a `shards synth --unlabeled N` tree (its synth.json), POOL_SHARDS the folder of shards packed from its
`unlabeled/` clips (`shards pack folder ... --segment-seconds 3`). The pool carries no labels, but the synth drew every
clip from a seeded plan, so the instruments whose notes sound in each packed segment are read back from that plan here
(for measuring only: nothing in Timbre trains on them). Every segment is scored by every model as one window; the
segments' audio is held in memory (~0.2 MB each at 16 kHz: ~5 GB for 25,000; `--every` thins them).

Prints one JSON object: per font, the segments and the LRAP of a random ranking of them (the yardstick); per model and
font, LRAP and mAP against the plan's instruments, and the precision and recall of the model's thresholded decisions
(what self-training on the pool would be taught).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from sklearn.metrics import label_ranking_average_precision_score

from core.errors import UserError, positive_int, run_cli
from finetune.folder import load_model
from finetune.inference import infer
from finetune.metrics import multilabel_metrics
from shards.audio import decode_flac, to_mono
from shards.loader import shard_urls
from shards.synth.music import TIMBRES
from shards.synth.plans import unlabeled_clips
from shards.vocab import INSTRUMENTS, multi_hot


def read_pool(pool: Path, shards: Path, every: int) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, int]:
    """Every `every`-th segment: (mono audio, (segments, classes) plan instruments, (segments,) font, sample rate)."""
    if not (pool / "synth.json").is_file():
        raise UserError(f"{pool}: no synth.json; pass the folder `shards synth --unlabeled N` wrote")
    info = json.loads((pool / "synth.json").read_text())
    options = info["options"]
    plans = {Path(clip.path).name: clip for clip in unlabeled_clips(options["seed"], options["unlabeled"])}
    fonts = {Path(clip["path"]).name: clip["soundfont"] for clip in info["clips"]["unlabeled"]}
    program_code = {patch.program: code for code, timbre in TIMBRES.items() for patch in timbre.patches}
    audio, truth, font, rate = [], [], [], 0
    samples = wds.WebDataset(shard_urls(str(shards)), shardshuffle=False, empty_check=False)
    for index, sample in enumerate(samples):
        if index % every:
            continue
        meta = json.loads(sample["json"])
        name = Path(meta["path"]).name
        if name not in plans or not isinstance(fonts.get(name), str):
            raise UserError(f"{shards}: segment of {name} is not one of {pool}/synth.json's single-font unlabeled "
                            "clips; pass the shards packed from that tree's unlabeled/ folder")
        start, end = meta["start"], meta["start"] + meta["duration"]
        sounding = {program_code[part.program] for part in plans[name].stems[0]
                    if not part.drums and part.program in program_code
                    and any(note.start < end and note.end > start for note in part.notes)}
        block, rate = decode_flac(sample["flac"])
        audio.append(to_mono(block, rate, rate))
        truth.append(multi_hot(sounding))
        font.append(fonts[name])
    return audio, np.array(truth), np.array(font), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path)
    parser.add_argument("shards", type=Path)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--every", type=positive_int, default=1, help="score every n-th segment (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    args = parser.parse_args()
    audio, truth, font, rate = read_pool(args.pool, args.shards, args.every)
    rows = {name: font == name for name in sorted(set(font))}
    rng = np.random.default_rng(0)
    result: dict = {"segments": len(truth), "instruments_per_segment": float(truth.sum(1).mean()), "fonts": {}}
    for name, chosen in rows.items():
        result["fonts"][name] = {"segments": int(chosen.sum()), "random_lrap": float(np.mean(
            [label_ranking_average_precision_score(truth[chosen], rng.random(truth[chosen].shape)) for _ in range(5)]))}
    result["models"] = {}
    for path in args.models:
        model = load_model(path, precision="auto")
        if model.info.sample_rate != rate:
            raise UserError(f"{path}: reads {model.info.sample_rate} Hz audio, the pool's shards hold {rate} Hz; "
                            "pack the pool at the model's rate")
        by_label = dict(zip(model.info.labels, model.info.thresholds))
        thresholds = np.array([by_label[code] for code in INSTRUMENTS])
        probabilities = np.stack([windows.aggregate("max") for _, windows in
                                  infer(model, enumerate(audio), batch_size=args.batch_size)])
        result["models"][path] = {}
        for name, chosen in rows.items():
            metrics = multilabel_metrics(probabilities[chosen], truth[chosen], thresholds, list(INSTRUMENTS))
            result["models"][path][name] = {"lrap": metrics["lrap"], "map": metrics["map"],
                                            "precision": metrics["micro_precision"], "recall": metrics["micro_recall"]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_cli(main)
