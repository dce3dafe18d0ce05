"""Throughput of a recipe as it really trains (loader, model, optimiser, logging), printed as one JSON object.

Runs `accelerate launch -m pretrain|finetune RECIPE` for a short run in a temporary folder, with TensorBoard
tracking, and reads back what the trainer logged every `--log-every` steps: clips/s (training only, saving and
validation excluded) and the loss. The first interval holds start-up (worker processes, kernel selection), so the
JSON reports the median of the later intervals as the steady rate, next to every interval's value.

    python bench/recipe_speed.py recipes/pretrain/mae-base.yaml --accelerate recipes/accelerate/gpu-1.yaml \
        --steps 300 data.train=[.gpu/shards/irmas-train/train]
    python bench/recipe_speed.py recipes/finetune/full-base.yaml --accelerate recipes/accelerate/gpu-1.yaml \
        --steps 200 backbone=runs/mae-base/backbone data.train=... data.val=...

Extra arguments are recipe overrides (key=value), as on the training command line. `--keep DIR` keeps the run
(its exported backbone or model) in DIR instead of a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def logged_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files the trainer wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({path.parent for path in tensorboard_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--accelerate", type=Path, required=True, help="accelerate config file (recipes/accelerate/)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--keep", type=Path, default=None, help="run folder to keep (default: a temporary one)")
    args, overrides = parser.parse_known_args()
    module = args.recipe.parent.name  # recipes/pretrain/... or recipes/finetune/...
    if module not in ("pretrain", "finetune"):
        parser.error(f"{args.recipe}: expected a recipe under recipes/pretrain/ or recipes/finetune/")
    with tempfile.TemporaryDirectory(prefix="recipe-speed-") as scratch:
        output_dir = args.keep or Path(scratch) / "run"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.accelerate),
            "-m", module, str(args.recipe), f"train.steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.checkpoint_every={args.steps}", "tracking=tensorboard", f"output_dir={output_dir}",
            "resume=none", *overrides,
        ]
        if module == "pretrain":
            command.append(f"train.image_every={args.steps}")
        start = time.perf_counter()
        finished = subprocess.run(command, check=False, stdout=sys.stderr)  # stdout holds only the JSON
        seconds = time.perf_counter() - start
        if finished.returncode != 0:
            sys.exit(f"{args.recipe}: the run failed (exit {finished.returncode}); its output is above")
        scalars = logged_scalars(Path(output_dir) / "tensorboard")
    rates = [round(value, 1) for _, value in scalars.get("clips_per_s", [])]
    losses = [round(value, 4) for _, value in scalars.get("loss", [])]
    print(json.dumps({
        "recipe": str(args.recipe), "overrides": overrides, "device": device_name(), "steps": args.steps,
        "log_every": args.log_every, "wall_s": round(seconds, 1),
        "steady_clips_per_s": statistics.median(rates[1:]) if len(rates) > 1 else None,
        "clips_per_s_by_interval": rates, "loss_by_interval": losses,
        "validation": {tag: round(points[-1][1], 4) for tag, points in scalars.items() if tag.startswith("val/")},
    }, indent=1))


if __name__ == "__main__":
    main()
