"""`python -m pretrain RECIPE.yaml [key=value ...]`: self-supervised pretraining from a recipe.

Runs the same under `accelerate launch -m pretrain RECIPE.yaml ...` (DDP over GPUs, nodes or CPU processes).
A recipe is plain YAML read into `PretrainRecipe`:

    data:        shards.loader.DataConfig, shared with fine-tuning: train (shard dirs / URLs), clip_seconds,
                 sample_rate, mix_max, mix_probability, same_genre_mix, views, view_source, shuffle_buffer, ...
    model:       pretrain.backbone.ModelConfig, shared with fine-tuning: size (cpu-2 | cpu-4 | tiny | small | base)
                 and optional overrides; max_frames is derived from data.clip_seconds
    backbone:    optional: a saved backbone (folder or Hub id) to go on pretraining instead of a new one, e.g. one
                 pretrained elsewhere or trained on labelled clips (<finetune output>/model/backbone), adapted to
                 your audio; the objectives' heads start new, `model` overrides must stay unset
    objectives:  mae / teacher / electra / metric, each with a weight (0 = off) and its settings (pretrain.objectives)
    augment:     pretrain.augment.WaveAugmentConfig: gain_db, filters, noise, pitch, reverb, each view of a clip on its
                 own (all off unless the recipe sets them)
    train:       core.trainer.TrainConfig (steps, batch_size per process, lr, precision, checkpoint_every, ...)
    probe:       optional labelled shards (train, val): a frozen-feature probe of the starting weights (step 0) and
                 at every checkpoint (pretrain.probe)
    tracking:    none | wandb | tensorboard        run_name, output_dir, resume (null | auto | checkpoint dir)

The backbone is written in the Hub format (`pretrain.hub.save_pretrained`) to `<output_dir>/backbone/` at every
checkpoint and at the end, with a model card naming the data, objectives, recipe, steps and final losses.
`python -m pretrain export RUN/checkpoints/step-N` writes the backbone of an earlier checkpoint the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import ArgumentParser, UserError, output_folder
from core.recipe import recipe_from_argv, to_dict
from core.trainer import TRACKERS, TrainConfig, latest_checkpoint, launch_state, train
from pretrain.augment import WaveAugment, WaveAugmentConfig
from pretrain.backbone import BackboneConfig, ModelConfig, param_groups
from pretrain.frontend import FrontendConfig
from pretrain.hub import load_backbone, load_for_training, save_pretrained
from pretrain.objectives import OBJECTIVES, ObjectivesConfig, Pretrainer
from pretrain.pictures import pictures
from pretrain.probe import Probe, ProbeConfig
from shards.loader import DataConfig, shard_urls


@dataclass
class PretrainRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    backbone: str | None = None  # a saved backbone (folder or Hub id) to go on pretraining; None: a new one
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    augment: WaveAugmentConfig = field(default_factory=lambda: WaveAugmentConfig(gain_db=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: str = "none"
    run_name: str | None = None
    output_dir: str = "runs/pretrain"
    resume: str | None = None


def backbone_config(recipe: PretrainRecipe, *, source: str | Path) -> BackboneConfig:
    """The recipe's model section; max_frames = the frames of one training clip."""
    frontend = FrontendConfig(sample_rate=recipe.data.sample_rate)
    try:
        return recipe.model.backbone_config(max_frames=frontend.num_frames(round(recipe.data.clip_seconds
                                                                                  * frontend.sample_rate)),
                                            frontend=frontend)
    except ValueError as error:
        raise UserError(f"{source}: model: {error}") from None


def run(recipe: PretrainRecipe, *, source: str | Path = "recipe") -> tuple[Pretrainer, dict]:
    """Pretrain as the recipe says; returns the trained module and the trainer's final state."""
    if not recipe.objectives.enabled():
        raise UserError(f"{source}: no objective enabled; set objectives.{OBJECTIVES[0]}.weight (or "
                        f"{'/'.join(OBJECTIVES[1:])}) above 0")
    if recipe.tracking not in TRACKERS:
        raise UserError(f"{source}: tracking: unknown tracker {recipe.tracking!r}; use one of {', '.join(TRACKERS)}")
    data = recipe.data
    if not data.train:
        raise UserError(f"{source}: data.train is missing; pass data.train=[SHARD_DIR, ...] (e.g. "
                        "demo/shards/unlabeled/train)")
    if data.val:
        raise UserError(f"{source}: data.val is not used by pretraining; remove it (fine-tuning recipes take it)")
    if recipe.train.ema_decay:
        raise UserError(f"{source}: train.ema_decay={recipe.train.ema_decay}: pretraining exports its weights as trained "
                        "(`pretrain export` reads them from checkpoints); the moving average is for fine-tuning, set "
                        "train.ema_decay=0")
    urls = shard_urls(data.train)
    output_dir = Path(recipe.output_dir)
    set_seed(recipe.train.seed)  # the same initial weights on every rank
    config = backbone_config(recipe, source=source)
    backbone = load_for_training(recipe.backbone, model=recipe.model, sample_rate=data.sample_rate,
                                 frames=config.max_frames, given=f"backbone={recipe.backbone}",
                                 source=source) if recipe.backbone else config
    try:
        model = Pretrainer(backbone=backbone, objectives=recipe.objectives)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None

    stream = dataclasses.replace(data, train=urls)
    probe = None
    if bool(recipe.probe.train) != bool(recipe.probe.val):
        raise UserError(f"{source}: probe needs both train and val labelled shards (or neither); e.g. probe.train="
                        "demo/shards/irmas-train/train probe.val=demo/shards/irmas-train/val")
    if recipe.probe.train and launch_state().is_main_process:  # the export and start hooks run on the main process
        probe = Probe(recipe.probe, sample_rate=data.sample_rate)

    cache = stream.sample_cache()

    def batches(epoch: int):
        return stream.batches(batch_size=recipe.train.batch_size, seed=recipe.train.seed, epoch=epoch, cache=cache)

    def export(trained: Pretrainer, directory: Path, state: dict) -> dict[str, float] | None:
        save_pretrained(trained.backbone, directory / "backbone", card={
            "name": recipe.run_name or f"Timbre {recipe.backbone or recipe.model.size} "
                                       f"({' + '.join(recipe.objectives.enabled())})",
            "data": urls,
            "initialised_from": recipe.backbone,
            "objectives": {name: f"weight {getattr(recipe.objectives, name).weight}"
                           for name in recipe.objectives.enabled()},
            "steps": state["step"],
            "metrics": {name: round(value, 5) for name, value in state["logs"].items()} or None,
            "recipe": to_dict(recipe),
        })
        return probe(trained) if probe else None

    augment = WaveAugment(config=recipe.augment, sample_rate=data.sample_rate).train()

    def loss_fn(module: Pretrainer, batch: dict, step: int):
        return module(dict(batch, audio=augment(batch["audio"])), progress=step / recipe.train.steps)

    groups = param_groups(model, backbone=model.backbone, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    trained = train(
        model=model, loss_fn=loss_fn,
        batches=batches, config=recipe.train,
        output_dir=output_dir, tracking=recipe.tracking, run_name=recipe.run_name, recipe=to_dict(recipe),
        resume=recipe.resume, param_groups=groups, export=export, start=probe, images=pictures,
    )
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return trained, state


def main(argv: list[str]) -> int:
    """Pretrain a spectrogram transformer from a YAML recipe."""
    given = recipe_from_argv(argv, PretrainRecipe, prog="python -m pretrain", description=main.__doc__,
                             example="recipes/pretrain/mae-tiny-synth.yaml")
    if given is None:
        return 0
    path, recipe = given
    _, state = run(recipe, source=path)
    if launch_state().is_main_process:
        logs = state["logs"]
        losses = ", ".join(f"{name} {logs[name]:.4f}" for name in OBJECTIVES if name in logs)
        print(f"pretrained {state['step']} steps: loss {logs.get('loss', float('nan')):.4f} ({losses}), "
              f"{state['clips_per_s']:.1f} clips/s; backbone in {Path(recipe.output_dir) / 'backbone'}")
    return 0


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None) -> tuple[Path, int | None]:
    """The backbone of a pretraining checkpoint (RUN/checkpoints/step-N) as a Hub folder, by default
    RUN/backbone-step-N; returns the folder and the checkpoint's step. The run's own RUN/backbone (written at every
    checkpoint) gives the geometry; the folder appears whole or not at all."""
    checkpoint = Path(checkpoint)
    weights_file = checkpoint / "model.safetensors"
    if not weights_file.is_file():
        latest = latest_checkpoint(checkpoint) or latest_checkpoint(checkpoint / "checkpoints")  # a run's folders
        raise UserError(f"{weights_file}: missing; pass " + (f"one of its checkpoints, e.g. {latest}" if latest else
                        "a checkpoint folder of a pretraining run, e.g. runs/mae-tiny-synth/checkpoints/step-001500"))
    run_dir = checkpoint.parent.parent
    template = run_dir / "backbone"
    if not (template / "config.json").is_file():
        raise UserError(f"{template / 'config.json'}: missing; export needs the run folder's backbone/ beside "
                        "checkpoints/ (a `python -m pretrain` run writes it at its first checkpoint)")
    out = Path(out) if out is not None else run_dir / f"backbone-{checkpoint.name}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; pass --out with a new folder, or remove this one")
    backbone = load_backbone(template)
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_file}: unreadable ({str(error).splitlines()[0][:120]}); the checkpoint was cut "
                        "short, pick another one") from None
    state = {name.removeprefix("backbone."): tensor for name, tensor in weights.items() if name.startswith("backbone.")}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{weights_file}: its backbone weights do not match {template / 'config.json'} "
                        f"({str(error).splitlines()[0][:160]}); pass a checkpoint of a pretraining run") from None
    trainer_state = checkpoint / "trainer_state.json"
    step = json.loads(trainer_state.read_text())["step"] if trainer_state.is_file() else None
    partial = output_folder(out.parent) / f".{out.name}.partial"
    save_pretrained(backbone, partial, card={"name": f"{run_dir.name}, {checkpoint.name}", "steps": step})
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out, step


def export_main(argv: list[str]) -> int:
    """Write the backbone of one pretraining checkpoint as a Hub folder (for a checkpoint before the last)."""
    parser = ArgumentParser(prog="python -m pretrain export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="RUN/checkpoints/step-N of a `python -m pretrain` run")
    parser.add_argument("--out", default=None, help="the new folder (default: RUN/backbone-step-N)")
    args = parser.parse_args(argv)
    out, step = export_checkpoint(args.checkpoint, args.out)
    print(f"backbone of {args.checkpoint} (step {step}) in {out}")
    return 0
