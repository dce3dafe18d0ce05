"""One Accelerate training loop for pretraining and fine-tuning.

Pretraining (`pretrain.train`) and fine-tuning (`finetune`) differ only in the model, the loss and the
data, so the loop lives here once: DDP on GPUs, nodes or CPU processes, bf16/fp16 autocast, gradient
accumulation, clipping, AdamW with linear warmup and cosine decay, optional `torch.compile`, an optional moving
average of the weights, atomic checkpoints, exact resume, trackers and a progress bar.

API
---
    config = TrainConfig(steps=1000, batch_size=32, lr=1.5e-4, ...)
    model = train(
        model=model,                      # nn.Module; DDP-wrapped by Accelerate
        loss_fn=loss_fn,                  # (wrapped model, batch on device, step) -> (loss, {name: float or 0-d Tensor})
        batches=batches,                  # epoch -> iterable of this rank's batches (dicts of tensors/lists)
        config=config, output_dir=Path("runs/x"),
        tracking="none" | "wandb" | "tensorboard", run_name=None,
        recipe=None,                      # dict, logged as the run config
        resume=None | "auto" | "path/to/checkpoints/step-000100",
        param_groups=None,                # AdamW groups, e.g. [{"params": [...], "lr": 1e-4}]; default: trainable params
        export=None,                      # (unwrapped model, output_dir, state) -> None or {name: float}; main process;
                                          # each checkpoint + end; returned values are logged as "val/<name>"
        start=None,                       # (unwrapped model) -> None or {name: float}; main process; a fresh run's
                                          # starting weights, logged as "val/<name>" at step 0
        images=None,                      # (unwrapped model, batch) -> {name: HxWx3 uint8}; main process; every image_every
    )                                     # returns the unwrapped, trained model (the averaged one with ema_decay)

Conventions the callers rely on:
- `steps` counts optimiser steps; one step consumes `grad_accum` batches from the stream. `batch_size` is not used by
  the loop itself: it is the per-process batch size the caller's `batches` should yield (effective batch =
  batch_size * grad_accum * processes), and it is what clips/s is computed from (the first dimension of the first
  tensor in each batch).
- `loss_fn` must call the model through `model(...)` (not a submodule) so DDP synchronises gradients, and it must run
  the same collectives on every rank. Tensors in the batch are moved to the device; other values are left alone.
  Logged names should be the same on every step (values are rank 0's averages over each `log_every` interval);
  values may be floats or detached 0-d tensors (tensors avoid a device sync per step).
- `batches(epoch)` must give every rank the same number of batches (the shards loader does); when an epoch runs
  out, the loop continues with `batches(epoch + 1)`. Resume re-creates the interrupted epoch and skips the batches
  already consumed, so a deterministic loader resumes at exactly the same sample.
- The learning rate of every param group follows `lr_factor(step)` (linear warmup over `warmup_steps`, cosine decay to
  `min_lr_rate` at `steps`) times its own `lr` (default `config.lr`).
- `export` and `images` run on the main process only and must not use collectives. What `export` returns (validation
  metrics, say) is logged to the tracker under `val/` at that step and printed as one line. Each `export` call gets
  `state` = {"step", "steps", "epoch", "logs": {name: value}, "clips_per_s", "finished"}, which an export can put in
  a model card; the loop also writes it to `<output_dir>/trainer_state.json`. `start` scores the weights a fresh run
  starts from (a random initialisation or a loaded backbone) the same way, logged and printed at step 0: the point a
  curve of `export`'s metrics should be read against. A resumed run does not call it. The hooks may be None on the
  other ranks; code that picks the main process before `train` starts asks `launch_state()`.
- Checkpoints: `<output_dir>/checkpoints/step-000100/` (Accelerate `save_state` + `trainer_state.json` with the
  schedule and data-stream position), written under a temporary name and renamed, so a kill during a save leaves
  the previous checkpoint intact; the last `keep_checkpoints` are kept; a final one is written at the end.
- `resume="auto"` continues from the newest complete checkpoint in `<output_dir>/checkpoints` (or starts fresh when
  there is none); model, optimiser, schedule, RNG states and data position are restored.
- `ema_decay` > 0 keeps an exponential moving average of the weights after every optimiser step
  (`torch.optim.swa_utils.AveragedModel`), its decay warmed up as TensorFlow's ExponentialMovingAverage does:
  min(ema_decay, (1 + n) / (10 + n)) after n updates, so short runs forget their starting weights (a 400-step run
  ends near 0.978 whatever the ceiling). `export` then gets the averaged model, not the trained one, and each
  checkpoint holds both, so a resumed run averages on as an unbroken one.
- DDP uses `find_unused_parameters=True`, so objectives may leave parameters without gradient on some steps.
- Tracking: `wandb` runs offline when no WANDB_API_KEY is set and WANDB_MODE is unset (files under
  `<output_dir>/wandb`; a resumed run continues the same W&B run id), `tensorboard` writes to
  `<output_dir>/tensorboard`; logged every `log_every` steps: "loss", each `loss_fn` log name, "grad_norm", "lr",
  "clips_per_s" (all processes, excluding checkpoint and image time); images are also written as PNG to
  `<output_dir>/images/`.
- On a CPU the loop calls `keep_freed_memory()`, a process-wide glibc setting that stops each step from page-faulting
  its activations back in.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedDataParallelKwargs, ProjectConfiguration, parse_flag_from_env, send_to_device,
                               set_seed)
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from core.errors import UserError
from core.files import write_json
from core.progress import progress_bar

CPU_COMPILERS = ("g++", "c++", "clang++")  # what inductor can build CPU kernels with
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TRACKERS = ("none", "wandb", "tensorboard")


# The one precision vocabulary, for training (autocast under Accelerate) and inference: name -> autocast dtype.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = (*PRECISIONS, "auto")  # what a recipe or command line may name (see resolve_precision)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by pretraining and fine-tuning recipes."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_rate: float = 0.0  # the cosine ends at lr x this (transformers' cosine_with_min_lr); 1.0 holds lr constant
    grad_accum: int = 1
    grad_clip: float = 1.0  # <= 0 disables clipping (the norm is still logged)
    precision: str = "fp32"  # one of PRECISIONS, or auto (see resolve_precision)
    compile: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    image_every: int = 0  # 0 disables images
    seed: int = 0
    # > 0: validate and export a moving average of the weights with this decay (at most; see the module docstring),
    # e.g. 0.99; 0 exports the weights as trained
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or auto; got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1; got {self.keep_checkpoints}")
        if not 0 <= self.min_lr_rate <= 1:
            raise ValueError(f"min_lr_rate is the fraction of lr the cosine ends at, in [0, 1]; got {self.min_lr_rate}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns the moving average off); got {self.ema_decay}")


def lr_factor(step: int, *, warmup_steps: int, steps: int, min_lr_rate: float = 0.0) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_rate` at `steps`. (transformers'
    get_cosine_with_min_lr_schedule_with_warmup is the same curve, but importing it pulls in transformers.trainer_utils
    and peft: ~5 s at the start of every process.)"""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ema_update(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """`AveragedModel`'s multi_avg_fn for a moving average whose decay after n updates is min(decay, (1 + n) / (10 + n))
    (TensorFlow's ExponentialMovingAverage with num_updates): each averaged tensor moves 1 - that towards the new one."""
    def update(averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        n = float(updates)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for mean, value in zip(averaged, current, strict=True):
            mean.lerp_(value, weight)
    return update


class BatchStream:
    """Endless batches over consecutive epochs that knows its position (epoch, batches consumed in it)."""

    def __init__(self, batches: Callable[[int], Iterable[dict]], *, epoch: int = 0, consumed: int = 0) -> None:
        self.batches = batches
        self.epoch = epoch
        self.consumed = consumed
        self.iterator: Iterator[dict] | None = None

    def restore(self) -> None:
        """Re-create the current epoch and skip what was consumed, without disturbing the global RNG."""
        states = _rng_states()
        self.iterator = iter(self.batches(self.epoch))
        for index in range(self.consumed):
            if next(self.iterator, None) is None:
                raise UserError(
                    f"resume: epoch {self.epoch} now yields only {index} batches but the checkpoint consumed "
                    f"{self.consumed}; resume with the same data and batch settings"
                )
        _set_rng_states(states)

    def __next__(self) -> dict:
        while True:
            if self.iterator is None:
                self.iterator = iter(self.batches(self.epoch))
            batch = next(self.iterator, None)
            if batch is not None:
                self.consumed += 1
                return batch
            if self.consumed == 0:
                raise UserError(f"training data: epoch {self.epoch} yielded no batches; check data.train")
            self.epoch, self.consumed, self.iterator = self.epoch + 1, 0, None


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); Linux only, else assumed."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def launch_state() -> PartialState:
    """This launch's process state (rank, device), on the CPU where ACCELERATE_USE_CPU says so. Accelerate keeps one
    per process and the first call fixes it: code that asks which process it is before `train` starts must ask here,
    or a CPU launch of several processes never joins one process group."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where `device` multiplies bf16 natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), else
    fp32; any other name as it is. Emulated bf16 is ~20x slower than fp32 on other CPUs, so auto never picks it there."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def keep_freed_memory() -> None:
    """Keep freed blocks of up to 32 MiB in the process instead of handing them back to the kernel (glibc only).

    By default glibc returns large freed blocks, so every CPU step faults its activation buffers back in: 16-20k
    page faults and 20-40 ms of kernel CPU time per MAE step at batch 16 on the 256x256 input (2 cores), none with
    this. The same buffers are reused, so peak memory does not change. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: bigger blocks are still mapped and unmapped
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def train(
    *,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict, int], tuple[Tensor, dict[str, float | Tensor]]],
    batches: Callable[[int], Iterable[dict]],
    config: TrainConfig,
    output_dir: Path,
    tracking: str = "none",
    run_name: str | None = None,
    recipe: dict | None = None,
    resume: str | None = None,
    param_groups: list[dict] | None = None,
    export: Callable[[nn.Module, Path, dict], dict[str, float] | None] | None = None,
    start: Callable[[nn.Module], dict[str, float] | None] | None = None,
    images: Callable[[nn.Module, dict], dict[str, np.ndarray]] | None = None,
) -> nn.Module:
    """Train `model` for `config.steps` optimiser steps; see the module docstring for the contract."""
    output_dir = Path(output_dir)
    accelerator = _accelerator(config, output_dir, tracking, resume)
    run = _Run(accelerator=accelerator, config=config, output_dir=output_dir, export=export)
    run.prepare(model, param_groups, batches)
    resumed = run.resume(_resume_path(resume, output_dir / "checkpoints"))
    if tracking != "none":
        accelerator.init_trackers(
            run_name or output_dir.name or "timbre",
            config=_flatten(recipe or {"train": vars(config)}),
            init_kwargs={"wandb": _wandb_kwargs(output_dir, run_name, resumed)} if tracking == "wandb" else {},
        )
    run.progress = progress_bar(total=config.steps, initial=run.step, enabled=accelerator.is_main_process,
                                desc="train")
    if not resumed:
        run.log_start(start)
    exported = False
    run.model.train()
    while run.step < config.steps:
        batch = run.optimiser_step(loss_fn)
        pause_start = time.perf_counter()
        if run.step % config.log_every == 0 or run.step == config.steps:
            run.log()
        if images is not None and config.image_every and run.step % config.image_every == 0:
            if accelerator.is_main_process:
                _log_images(accelerator, accelerator.unwrap_model(run.model), images, batch, run.step, output_dir)
            accelerator.wait_for_everyone()
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            run.checkpoint()
            run.export_model(finished=run.step == config.steps)
            exported = run.step == config.steps
        run.paused += time.perf_counter() - pause_start
    run.progress.close()
    if not exported:  # resumed from a checkpoint at or past the last step
        run.export_model(finished=True)
    accelerator.end_training()
    return run.exported_model()


def _accelerator(config: TrainConfig, output_dir: Path, tracking: str, resume: str | None) -> Accelerator:
    """Check the run's folder and the launch, then make the Accelerator (precision, compile, tracker, DDP)."""
    if tracking not in TRACKERS:
        raise UserError(f"tracking: unknown tracker {tracking!r}; use one of {', '.join(TRACKERS)}")
    check_output_dir(output_dir, resume)
    if tracking == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    device = launch_state().device
    precision = resolve_precision(config.precision, device)
    if config.compile and device.type == "cpu":
        if not any(map(shutil.which, CPU_COMPILERS)):
            raise UserError("train.compile=true: torch.compile builds C++ kernels on CPUs and no C++ compiler was found "
                            f"({', '.join(CPU_COMPILERS)}); install one (sudo apt-get install g++) or set "
                            "train.compile=false")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found": no news here
    accelerator = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        dynamo_backend="inductor" if config.compile else "no",
        log_with=None if tracking == "none" else tracking,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / tracking)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()
        if precision == "bf16" and not cpu_has_bf16():
            accelerator.print("warning: train.precision=bf16 on a CPU without AVX512-BF16 or AMX: torch emulates bf16 "
                              "matmuls there, ~20x slower than fp32 (measured 13.8 s against 0.55 s a step); use "
                              "train.precision=fp32")
    if config.precision == "auto":
        accelerator.print(f"train.precision=auto: {precision} on {device.type}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise UserError(
            f"accelerate launch started {launched} processes but they did not join one process group (each would "
            "train alone); on CPUs set ACCELERATE_USE_CPU=1, e.g. ACCELERATE_USE_CPU=1 accelerate launch "
            "--config_file recipes/accelerate/cpu-2.yaml -m pretrain RECIPE.yaml"
        )
    set_seed(config.seed, device_specific=True)
    checkpoints = output_dir / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return accelerator


@dataclass
class _Run:
    """One training run's moving parts between steps: model, optimiser, schedule, data position, running logs."""

    accelerator: Accelerator
    config: TrainConfig
    output_dir: Path
    export: Callable[[nn.Module, Path, dict], dict[str, float] | None] | None
    step: int = 0
    progress: Any = None
    paused: float = 0.0  # seconds spent checkpointing, exporting and drawing since the last log (not training)

    def prepare(self, model: nn.Module, param_groups: list[dict] | None, batches: Callable[[int], Iterable[dict]]
                ) -> None:
        config = self.config
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        # fused: one kernel per parameter; the default per-tensor loop costs ~13 ms a step for the tiny MAE's 183
        # tensors on a CPU, ~4 ms fused, which is 5-9% of a step.
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas),
                                      weight_decay=config.weight_decay, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup_steps=config.warmup_steps, steps=config.steps,
                                              min_lr_rate=config.min_lr_rate))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.average = None
        if config.ema_decay:
            # every rank keeps the same average (the weights are the same); checkpoints save the main process's
            self.average = AveragedModel(self.accelerator.unwrap_model(self.model, keep_torch_compile=False),
                                         multi_avg_fn=ema_update(config.ema_decay))
            self.accelerator.register_for_checkpointing(self.average)
        self.batches, self.stream = batches, BatchStream(batches)
        self.sums: dict[str, Tensor | float] = defaultdict(float)
        self.count, self.clips, self.last_time = 0, 0, time.perf_counter()
        self.summary = {"logs": {}, "clips_per_s": 0.0}

    def resume(self, checkpoint: Path | None) -> bool:
        """Model, optimiser, schedule, RNG and data position from `checkpoint`; False when there is none."""
        if checkpoint is None:
            return False
        averaged = (checkpoint / "custom_checkpoint_0.pkl").is_file()
        if averaged != (self.average is not None):
            raise UserError(f"{checkpoint}: written {'with' if averaged else 'without'} a moving average of the weights "
                            f"but train.ema_decay={self.config.ema_decay}; resume with the run's own train.ema_decay")
        self.accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.schedule.load_state_dict(state["schedule"])
        self.step = state["step"]
        self.stream = BatchStream(self.batches, epoch=state["epoch"], consumed=state["consumed"])
        self.stream.restore()
        self.summary = _previous_summary(self.output_dir)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.step}")
        return True

    def optimiser_step(self, loss_fn: Callable) -> dict:
        """`grad_accum` batches forward and backward, clip, one optimiser and schedule step; the last batch."""
        accelerator, config = self.accelerator, self.config
        for micro in range(config.grad_accum):
            batch = send_to_device(next(self.stream), accelerator.device, non_blocking=True)
            self.clips += _batch_size(batch) * accelerator.num_processes
            sync = micro == config.grad_accum - 1
            with accelerator.no_sync(self.model) if not sync else nullcontext(), accelerator.autocast():
                loss, logs = loss_fn(self.model, batch, self.step)
            accelerator.backward(loss / config.grad_accum)
            for name, value in {"loss": loss, **logs}.items():  # tensors stay on the device until logging
                self.sums[name] += (value.detach() if isinstance(value, Tensor) else value) / config.grad_accum
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        self.sums["grad_norm"] += accelerator.clip_grad_norm_(self.model.parameters(), max_norm).detach()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update_parameters(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        self.step += 1
        self.count += 1
        self.progress.update(1)
        return batch

    def log(self) -> None:
        """Averages since the last log, the lr and clips/s of training (not of saving) to the tracker and the bar."""
        elapsed = time.perf_counter() - self.last_time - self.paused
        logs = {name: float(value) / self.count for name, value in self.sums.items()}
        logs["lr"] = self.schedule.get_last_lr()[0]
        logs["clips_per_s"] = self.clips / max(elapsed, 1e-9)
        self.accelerator.log(logs, step=self.step)
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}", clips_s=f"{logs['clips_per_s']:.1f}")
        self.summary = {"logs": logs, "clips_per_s": logs["clips_per_s"]}
        self.sums.clear()
        self.count, self.clips, self.last_time, self.paused = 0, 0, time.perf_counter(), 0.0

    def checkpoint(self) -> None:
        _checkpoint(self.accelerator, self.schedule, self.stream, self.step, self.output_dir / "checkpoints",
                    self.config.keep_checkpoints)

    def log_start(self, start: Callable[[nn.Module], dict[str, float] | None] | None) -> None:
        """Score the starting weights with `start` (main process) and log what it returns at step 0. Every rank
        calls this, so that all meet at the barrier whether or not their `start` is None."""
        if start is not None and self.accelerator.is_main_process:
            self.log_validation(start(self.accelerator.unwrap_model(self.model)))
        self.accelerator.wait_for_everyone()

    def log_validation(self, metrics: dict[str, float] | None) -> None:
        """Metrics under `val/` at the current step, and one printed line (main process)."""
        if metrics:
            self.accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=self.step)
            self.progress.write(f"step {self.step} validation: " + "  ".join(f"{name} {value:.3f}"
                                                                          for name, value in metrics.items()))

    def export_model(self, *, finished: bool) -> None:
        """Write trainer_state.json and call the export hook with that state (main process); log what it returns."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            state = {"step": self.step, "steps": self.config.steps, "epoch": self.stream.epoch, "finished": finished,
                     **self.summary}
            write_json(self.output_dir / "trainer_state.json", state)
            self.log_validation(self.export(self.exported_model(), self.output_dir, state) if self.export else None)
        accelerator.wait_for_everyone()

    def exported_model(self) -> nn.Module:
        """What the run validates and exports: the moving average of the weights when there is one, else the model."""
        return self.average.module if self.average is not None else self.accelerator.unwrap_model(self.model)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint in `checkpoints` (temporary, half-written ones are ignored)."""
    found = []
    for path in Path(checkpoints).glob("step-*"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


NO_RESUME = (None, "", "none", "no")  # recipe values of `resume` that start a fresh run
RUN_OUTPUTS = ("trainer_state.json", "checkpoints", "model", "backbone")  # what a run writes into output_dir


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse, before any work, an output_dir that is a file, or that holds an earlier run and no resume was asked:
    a new run there would overwrite the finished model and mix two runs' checkpoints."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir={output_dir}: is a file, not a folder; pass a folder path for the run")
    if resume not in NO_RESUME:
        _resume_path(resume, output_dir / "checkpoints")  # a resume path that is no checkpoint fails here, early
        return
    found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if found:
        state = output_dir / "trainer_state.json"
        try:
            done = json.loads(state.read_text())
            what = f"a {'finished' if done['step'] >= done['steps'] else 'stopped'} run (step {done['step']} of {done['steps']})"
        except (OSError, ValueError, KeyError, TypeError):
            what = f"an earlier run ({', '.join(found)})"
        raise UserError(f"output_dir={output_dir}: already holds {what}; continue it with resume=auto, or pass a new "
                        "output_dir=..., or delete the folder first")


def _resume_path(resume: str | None, checkpoints: Path) -> Path | None:
    if resume in NO_RESUME:
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"{path}: not a complete training checkpoint (no trainer_state.json); "
            f"pass resume=auto or a folder such as {checkpoints}/step-000100"
        )
    return path


def _checkpoint(
    accelerator: Accelerator, schedule: Any, stream: BatchStream, step: int, checkpoints: Path, keep: int
) -> None:
    """save_state into a temporary folder, then rename: a kill at any point leaves the last checkpoint usable.
    (Accelerate's automatic_checkpoint_naming/total_limit would save in place, losing that; hence our own.)"""
    final = checkpoints / f"step-{step:06d}"
    temporary = checkpoints / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "epoch": stream.epoch, "consumed": stream.consumed, "schedule": schedule.state_dict()}
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        complete = sorted(p for p in checkpoints.glob("step-*") if CHECKPOINT_PATTERN.match(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _previous_summary(output_dir: Path) -> dict:
    """The last logged values of an earlier run in `output_dir` (kept when a resumed run logs nothing new)."""
    path = output_dir / "trainer_state.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"logs": state.get("logs", {}), "clips_per_s": state.get("clips_per_s", 0.0)}


def _log_images(
    accelerator: Accelerator,
    unwrapped: nn.Module,
    images: Callable[[nn.Module, dict], dict[str, np.ndarray]],
    batch: dict,
    step: int,
    output_dir: Path,
) -> None:
    from PIL import Image

    was_training, states = unwrapped.training, _rng_states()  # pictures must not change the training run
    unwrapped.eval()
    with torch.no_grad():
        pictures = images(unwrapped, batch)
    unwrapped.train(was_training)
    _set_rng_states(states)
    folder = output_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures.items():
        Image.fromarray(picture).save(folder / f"step-{step:06d}-{name.replace('/', '-')}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({name: [picture] for name, picture in pictures.items()}, step=step)
        elif tracker.name == "tensorboard":
            for name, picture in pictures.items():
                tracker.writer.add_image(name, picture, global_step=step, dataformats="HWC")


def _wandb_kwargs(output_dir: Path, run_name: str | None, resumed: bool) -> dict:
    """A stable run id stored next to the run, so a resumed run continues the same W&B run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    id_file = output_dir / "wandb-run-id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    kwargs = {"dir": str(output_dir), "id": id_file.read_text().strip(), "resume": "allow" if resumed else None}
    if run_name:
        kwargs["name"] = run_name
    return {k: v for k, v in kwargs.items() if v is not None}


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> flat {"a.b": scalar} that every tracker accepts as hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
