"""Timbre's backbone against transformers' ASTModel of the same size, same weights, same 3 s input.

Prints one JSON object: clips/s of forward (inference) and forward+backward for both models in fp32
and under bf16 autocast, and the ratios Timbre / ASTModel. Measurements of the two models are
interleaved so that load from other processes hits both alike; each measurement times `--steps` consecutive
steps after one untimed step (a model in use runs step after step, so its weights are in cache; alternating
single steps of two models would time cache misses instead), the two take turns going first, and each figure
is the best of `--repeats`.
Clips per second of wall-clock time and of process CPU time are both given: on a machine shared
with other jobs the CPU-time figures are the stable ones (waiting for a core costs no CPU time).

    python bench/backbone.py [--size tiny|small|base] [--batch 8] [--repeats 10] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import ASTModel

from core.trainer import keep_freed_memory
from pretrain.backbone import Backbone, BackboneConfig
from pretrain.hub import save_pretrained

CLIP_FRAMES = 298  # 3 s at 16 kHz


def step(model: torch.nn.Module, features: torch.Tensor, *, backward: bool, bf16: bool) -> None:
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with precision, (nullcontext() if backward else torch.inference_mode()):
        output = model(features)
        hidden = output.hidden if isinstance(model, Backbone) else output.last_hidden_state
    if backward:
        hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)


def clips_per_second(model: torch.nn.Module, features: torch.Tensor, *, steps: int, backward: bool,
                     bf16: bool) -> tuple[float, float]:
    """(clips per wall-clock second, clips per CPU second) over `steps` steps, after one untimed step."""
    step(model, features, backward=backward, bf16=bf16)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(model, features, backward=backward, bf16=bf16)
    clips = steps * features.shape[0]
    return clips / (time.perf_counter() - wall), clips / (time.process_time() - cpu)


def cpu_name() -> str:
    """The CPU model and whether it has AVX512-BF16 (Linux), else the architecture."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{model or platform.machine()}{' (avx512_bf16)' if 'avx512_bf16' in info else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="even, so each model goes first equally often")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    keep_freed_memory()  # as the trainer does on a CPU
    torch.manual_seed(0)
    ours = Backbone(BackboneConfig.from_size(args.size, max_frames=CLIP_FRAMES)).train()
    with tempfile.TemporaryDirectory() as folder:  # the same weights, through the exported Hub folder
        save_pretrained(ours, folder)
        theirs = ASTModel.from_pretrained(folder, attn_implementation="sdpa").train()
    features = torch.randn(args.batch, CLIP_FRAMES, 128)
    with torch.inference_mode():
        difference = (ours(features).hidden - theirs(features).last_hidden_state).abs().max().item()

    results: dict[str, dict[str, dict[str, float]]] = {"wall": {}, "cpu": {}}
    for precision in ("fp32", "bf16"):
        for mode in ("forward", "forward_backward"):
            kwargs = dict(backward=mode == "forward_backward", bf16=precision == "bf16")
            for model in (ours, theirs):  # warm-up: allocator, oneDNN kernels
                step(model, features, **kwargs)
            best = {clock: {"timbre": 0.0, "transformers": 0.0} for clock in results}
            contenders = [("timbre", ours), ("transformers", theirs)]
            for repeat in range(args.repeats):
                for name, model in contenders[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
                    wall, cpu = clips_per_second(model, features, steps=args.steps, **kwargs)
                    best["wall"][name] = max(best["wall"][name], wall)
                    best["cpu"][name] = max(best["cpu"][name], cpu)
            for clock, figures in best.items():
                results[clock][f"{mode}_{precision}"] = {
                    **{name: round(value, 2) for name, value in figures.items()},
                    "ratio": round(figures["timbre"] / figures["transformers"], 3)}
    print(json.dumps({
        "benchmark": "backbone",
        "size": args.size,
        "batch": args.batch,
        "steps_per_measurement": args.steps,
        "frames": CLIP_FRAMES,
        "tokens": ours.grid(CLIP_FRAMES)[0] * ours.grid(CLIP_FRAMES)[1] + 2,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "max_abs_difference_fp32": difference,
        "clips_per_second": results["wall"],
        "clips_per_cpu_second": results["cpu"],
        "bf16_speedup_timbre": {
            clock: {mode: round(figures[f"{mode}_bf16"]["timbre"] / figures[f"{mode}_fp32"]["timbre"], 3)
                    for mode in ("forward", "forward_backward")}
            for clock, figures in results.items()},
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
