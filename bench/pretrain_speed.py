"""Pretraining step throughput on this CPU (or a CUDA GPU with --device cuda), printed as one JSON object.

Compares, in one run, on a square 256-frame x 256-mel log-mel input (16 x 16 patches of 16x16; ViTMAE's loss
only accepts square images) and on the recipes' 3 s input (288 frames x 128 mels = 8 x 18 patches):
- Timbre's MAE training step against transformers' `ViTMAEForPreTraining` at the same encoder and decoder
  size, mask ratio and normalised-patch loss (ViTMAE takes the spectrogram as a 1-channel image);
- the MAE step (encoder on the 20% visible patches) against a full-token SSAST-style step (encoder on every
  patch, masked ones included, with a per-token reconstruction head);
- achieved model FLOP/s (FLOPs counted by torch's FlopCounterMode) as a fraction of a large matmul's FLOP/s;
- fp32 and bf16 autocast.
Timings are the best of several rounds, with every contender in both precisions taking turns, because the
cores may be shared.

    python bench/pretrain_speed.py [--batch 16] [--steps 4] [--rounds 5] [--size tiny] [--threads N]
    python bench/pretrain_speed.py --device cuda --size base --decoder 512x8 --batch 128 --steps 10 --rounds 3
Targets: >= 1.0x ViTMAE in fp32; MAE >= 3x the full-token step; bf16 >= 1.5x fp32. On a GPU, fp32 matmuls run in
full fp32 (torch's default, no TF32), as the trainer runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.trainer import cpu_has_bf16, keep_freed_memory
from pretrain.backbone import BackboneConfig, patchify, unpatchify
from pretrain.frontend import FrontendConfig
from pretrain.objectives import (  # noqa: E501
    MAEConfig,
    ObjectivesConfig,
    Pretrainer,
    mask_patches,
    masked_patch_loss,
    normalise_patches,
)

PATCH = 16
SQUARE = (256, 256)  # frames, mels: an input both models accept
RECIPE = (288, 128)  # 3 s at 16 kHz (298 frames, cropped to whole patches)


class FullToken(nn.Module):
    """SSAST-style: masked patches replaced by a learned embedding inside the encoder, which sees all tokens."""

    def __init__(self, pretrainer: Pretrainer) -> None:
        super().__init__()
        self.pretrainer = pretrainer
        self.head = nn.Linear(pretrainer.backbone.hidden_size, PATCH * PATCH)
        self.mask_embedding = nn.Parameter(torch.zeros(PATCH * PATCH))

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        backbone = self.pretrainer.backbone
        grid = backbone.grid(features.shape[1])
        _, masked = mask_patches(features.shape[0], grid, features.device, config=self.pretrainer.objectives.mae)
        patches = patchify(features, PATCH)
        hidden = patches.masked_scatter(masked[..., None], self.mask_embedding.expand_as(patches)[masked])
        prediction = self.head(backbone(unpatchify(hidden, grid, PATCH)).tokens)
        return masked_patch_loss(prediction, normalise_patches(patches), masked)


def timbre_mae(size: str, mae: MAEConfig, frames: int, mels: int) -> Pretrainer:
    backbone = BackboneConfig.from_size(size, max_frames=frames, num_mel_bins=mels,
                                        frontend=FrontendConfig(num_mel_bins=mels))
    return Pretrainer(backbone=backbone, objectives=ObjectivesConfig(mae=mae))


def vitmae(size: str, mae: MAEConfig, frames: int, mels: int) -> nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    backbone = BackboneConfig.from_size(size)
    config = ViTMAEConfig(
        hidden_size=backbone.hidden_size, num_hidden_layers=backbone.num_layers, num_attention_heads=backbone.num_heads,
        intermediate_size=backbone.intermediate_size, decoder_hidden_size=mae.decoder_hidden_size,
        decoder_num_hidden_layers=mae.decoder_layers, decoder_num_attention_heads=mae.decoder_heads,
        decoder_intermediate_size=mae.decoder_intermediate_size, mask_ratio=mae.mask_ratio, norm_pix_loss=True,
        image_size=(mels, frames), patch_size=PATCH, num_channels=1, qkv_bias=True,
    )
    return ViTMAEForPreTraining._from_config(config, attn_implementation="sdpa")


def step_fn(model: nn.Module, loss: Callable[[], torch.Tensor], dtype: torch.dtype | None) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
    device_type = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype) if dtype else nullcontext():
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(steps: dict[str, Callable[[], None]], *, count: int, rounds: int, device: torch.device
                 ) -> dict[str, float]:
    """Best per-step time of each contender over `rounds` interleaved rounds of `count` steps."""
    for step in steps.values():
        step()
        step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                step()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / count)
    return best


def step_flops(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, rounds: int = 10) -> float:
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier when other jobs share the cores")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--decoder", default="128x2",
                        help="MAE decoder WIDTHxLAYERS (heads of 32 dims, MLP 4x wide); mae-base.yaml's is 512x8")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on a CPU
    torch.manual_seed(0)
    width, layers = (int(part) for part in args.decoder.split("x"))
    mae = MAEConfig(mask_ratio=0.8, masking="random", decoder_hidden_size=width, decoder_layers=layers,
                    decoder_heads=width // 32, decoder_intermediate_size=4 * width)
    square, recipe = torch.randn(args.batch, *SQUARE, device=device), torch.randn(args.batch, *RECIPE, device=device)
    pixels = square.transpose(1, 2)[:, None].contiguous()  # the same spectrogram as a (B, 1, mels, frames) image
    ours, theirs = timbre_mae(args.size, mae, *SQUARE).to(device), vitmae(args.size, mae, *SQUARE).to(device)
    full = FullToken(timbre_mae(args.size, mae, *SQUARE)).to(device)
    ours_recipe = timbre_mae(args.size, mae, *RECIPE).to(device)
    full_recipe = FullToken(timbre_mae(args.size, mae, *RECIPE)).to(device)
    on_gpu = device.type == "cuda"
    result: dict = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "batch": args.batch,
        "square_input": f"{SQUARE[0]} frames x {SQUARE[1]} mels (16 x 16 patches)",
        "recipe_input": f"{RECIPE[0]} frames x {RECIPE[1]} mels (8 x 18 patches)",
        "size": args.size, "mask_ratio": mae.mask_ratio,
        "decoder": f"{mae.decoder_hidden_size} wide, {mae.decoder_layers} layers",
        "note": "best of interleaved rounds; compare the ratios",
    }
    # Emulated bf16 (CPUs without AVX512-BF16/AMX) runs ~20x slower than fp32 and would take the run past minutes.
    native_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_bf16()
    precisions = (("fp32", None), ("bf16", torch.bfloat16)) if native_bf16 else (("fp32", None),)
    steps = {}
    for label, dtype in precisions:
        steps[label] = {
            "timbre_mae": step_fn(ours, lambda: ours.mae(square)["loss"], dtype),
            "vitmae": step_fn(theirs, lambda: theirs(pixel_values=pixels).loss, dtype),
            "full_token": step_fn(full, lambda: full.loss(square), dtype),
            "timbre_mae_3s": step_fn(ours_recipe, lambda: ours_recipe.mae(recipe)["loss"], dtype),
            "full_token_3s": step_fn(full_recipe, lambda: full_recipe.loss(recipe), dtype),
        }
    # Both precisions take turns in the same rounds: the bf16/fp32 ratio then compares like with like even when
    # the machine's speed drifts during the run.
    seconds = best_seconds({f"{label}/{name}": step for label in steps for name, step in steps[label].items()},
                           count=args.steps, rounds=args.rounds, device=device)
    for label, dtype in precisions:
        timed = {name: seconds[f"{label}/{name}"] for name in steps[label]}
        flops = step_flops(steps[label]["timbre_mae"])
        peak = matmul_flops_per_s(dtype or torch.float32, device)
        result[label] = {
            **{f"{name}_clips_per_s": round(args.batch / s, 2) for name, s in timed.items()},
            "mae_vs_vitmae": round(timed["vitmae"] / timed["timbre_mae"], 3),
            "mae_vs_full_token": round(timed["full_token"] / timed["timbre_mae"], 3),
            "mae_vs_full_token_3s": round(timed["full_token_3s"] / timed["timbre_mae_3s"], 3),
            "mae_step_gflop": round(flops / 1e9, 3),
            "mae_gflop_per_s": round(flops / timed["timbre_mae"] / 1e9, 2),
            "matmul_gflop_per_s": round(peak / 1e9, 2),
            "mae_fraction_of_matmul": round(flops / timed["timbre_mae"] / peak, 3),
        }
    result["targets_met"] = {
        "mae_vs_vitmae_fp32>=1.0": result["fp32"]["mae_vs_vitmae"] >= 1.0,
        "mae_vs_full_token>=3": result["fp32"]["mae_vs_full_token"] >= 3.0,
    }
    if "bf16" in result:
        result["bf16_vs_fp32"] = round(result["bf16"]["timbre_mae_clips_per_s"] / result["fp32"]["timbre_mae_clips_per_s"],
                                       3)
        result["bf16_vs_fp32_3s"] = round(
            result["bf16"]["timbre_mae_3s_clips_per_s"] / result["fp32"]["timbre_mae_3s_clips_per_s"], 3)
        result["targets_met"]["bf16_vs_fp32>=1.5"] = result["bf16_vs_fp32"] >= 1.5
    else:
        result["bf16"] = "not measured: this CPU has no AVX512-BF16 or AMX, so torch emulates bf16 (~20x slower)"
    if on_gpu:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
