"""Whole-file inference: `finetune.evaluate`'s batched windowing against one window at a time, same model, one run.

    python bench/inference.py [MODEL_DIR] [--minutes 10] [--batch-size 32]

Without MODEL_DIR a tiny Fluffy classifier (random weights, 3 s clips) stands in; speed does not depend on the weights.
Prints one JSON object: seconds, real-time factor (processing seconds per audio second) and x-real-time for both
paths, the speed-up (target >= 3) and the largest probability difference between them; then the batched path again
with `--precision bf16` (autocast), against both fp32 paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np
import torch

from finetune.folder import FinetunedModel, load_model
from finetune.heads import HeadConfig
from finetune.inference import infer
from finetune.model import Classifier
from finetune.train import FinetuneRecipe, build_classifier, model_info
from pretrain.encoder import cut_windows


def stand_in() -> FinetunedModel:
    recipe = FinetuneRecipe(head=HeadConfig(kind="fluffy", hidden=64))
    classifier: Classifier = build_classifier(recipe).eval()
    return FinetunedModel(classifier=classifier, info=model_info(recipe), path="(tiny fluffy stand-in)")


def music(seconds: float, rate: int) -> torch.Tensor:
    """A changing chord with noise: content does not matter for speed, only that it is not silence."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 220 * 2 ** (np.floor(t / 2) % 12 / 12)
    audio = np.sin(2 * np.pi * np.cumsum(pitch) / rate) + 0.5 * np.sin(2 * np.pi * 1.5 * np.cumsum(pitch) / rate)
    return torch.from_numpy((0.2 * audio + 0.01 * rng.standard_normal(len(t))).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model = load_model(args.model) if args.model else stand_in()
    audio = music(args.minutes * 60, model.info.sample_rate)
    seconds = audio.shape[0] / model.info.sample_rate
    warm = audio[: 4 * model.window]  # one-time kernel set-up is paid before either clock starts
    list(infer(model, [(0, warm)], batch_size=args.batch_size))
    model.classifier.predict(warm[None, : model.window].to(model.device))

    start = time.perf_counter()
    [(_, result)] = list(infer(model, [(0, audio)], batch_size=args.batch_size))
    batched = time.perf_counter() - start

    start = time.perf_counter()
    windows, _ = cut_windows(audio, model.window, model.hop())
    one_by_one = np.stack([model.classifier.predict(window[None].to(model.device))[0][0].cpu().numpy()
                           for window in windows])
    loop = time.perf_counter() - start

    bf16 = dataclasses.replace(model, precision="bf16")
    list(infer(bf16, [(0, warm)], batch_size=args.batch_size))
    start = time.perf_counter()
    [(_, result_bf16)] = list(infer(bf16, [(0, audio)], batch_size=args.batch_size))
    batched_bf16 = time.perf_counter() - start

    print(json.dumps({
        "bench": "inference", "model": model.path, "audio_seconds": seconds, "windows": len(windows),
        "clip_seconds": model.info.clip_seconds, "hop_seconds": model.info.hop_seconds, "batch_size": args.batch_size,
        "batched": {"seconds": round(batched, 3), "real_time_factor": round(batched / seconds, 5),
                    "x_real_time": round(seconds / batched, 1)},
        "loop": {"seconds": round(loop, 3), "real_time_factor": round(loop / seconds, 5),
                 "x_real_time": round(seconds / loop, 1)},
        "speedup": round(loop / batched, 2), "target_speedup": 3.0, "target_met": loop / batched >= 3.0,
        "max_abs_difference": float(np.abs(one_by_one - result.probabilities).max()),
        "batched_bf16": {"seconds": round(batched_bf16, 3), "x_real_time": round(seconds / batched_bf16, 1),
                         "vs_batched_fp32": round(batched / batched_bf16, 2), "vs_loop_fp32": round(loop / batched_bf16, 2),
                         "max_abs_difference_vs_fp32": float(np.abs(result_bf16.probabilities - result.probabilities).max())},
        "device": str(model.device), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
