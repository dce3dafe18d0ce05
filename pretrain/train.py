"""`python -m pretrain RECIPE.yaml [key=value ...]`: self-supervised pretraining from a recipe.

Runs the same under `accelerate launch -m pretrain RECIPE.yaml ...` (DDP over GPUs, nodes or CPU processes).
A recipe is plain YAML read into `PretrainRecipe`:

    data:        shards (list of shard dirs / URLs), clip_seconds, mix_max, mix_probability, same_genre_mix,
                 views, shuffle_buffer, batches_per_epoch, num_workers
    model:       size (tiny | small | base) and optional hidden_size, num_layers, num_heads, intermediate_size,
                 patch_size, dropout; max_frames is derived from data.clip_seconds
    objectives:  mae / electra / metric, each with a weight (0 = off) and its settings (pretrain.objectives)
    train:       core.trainer.TrainConfig (steps, batch_size per process, lr, precision, checkpoint_every, ...)
    tracking:    none | wandb | tensorboard        run_name, output_dir, resume (null | auto | checkpoint dir)

The backbone is written in the Hub format (`pretrain.hub.save_pretrained`) to `<output_dir>/backbone/` at every
checkpoint and at the end, with a model card naming the data, objectives, recipe, steps and final losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from accelerate.utils import set_seed

from core.errors import ArgumentParser, UserError
from core.recipe import load_recipe, to_dict
from core.trainer import TRACKERS, TrainConfig, train
from pretrain.backbone import BackboneConfig, param_groups
from pretrain.frontend import FrontendConfig
from pretrain.hub import save_pretrained
from pretrain.objectives import ObjectivesConfig, Pretrainer
from shards.loader import shard_urls, train_batches

DEMO_SHARDS = ["demo/shards/unlabeled/train", "demo/shards/irmas-train/train"]


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=lambda: list(DEMO_SHARDS))
    clip_seconds: float = 3.0
    mix_max: int = 1  # up to this many clips summed into one example (labels unioned)
    mix_probability: float = 0.5
    same_genre_mix: bool = False
    views: int = 1  # crops per clip; the metric objective augments one crop twice when 1
    shuffle_buffer: int = 512
    batches_per_epoch: int | None = None  # default: one pass over the shards
    num_workers: int = 0
    bad_shards: Literal["stop", "skip"] = "stop"  # a shard that does not read: stop the run, or skip it


@dataclass
class ModelConfig:
    size: str = "tiny"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    patch_size: int | None = None
    dropout: float | None = None


@dataclass
class PretrainRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: str = "none"
    run_name: str | None = None
    output_dir: str = "runs/pretrain"
    resume: str | None = None


def backbone_config(recipe: PretrainRecipe, *, source: str | Path) -> BackboneConfig:
    """The recipe's size plus overrides; max_frames = the frames of one training clip."""
    frontend = FrontendConfig()
    max_frames = frontend.num_frames(round(recipe.data.clip_seconds * frontend.sample_rate))
    overrides = {f.name: getattr(recipe.model, f.name) for f in fields(ModelConfig) if f.name != "size"}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if "patch_size" in overrides:
        overrides["frequency_stride"] = overrides["time_stride"] = overrides["patch_size"]
    try:
        return BackboneConfig.from_size(recipe.model.size, max_frames=max_frames, frontend=frontend, **overrides)
    except ValueError as error:
        raise UserError(f"{source}: model: {error}") from None


def run(recipe: PretrainRecipe, *, source: str | Path = "recipe") -> tuple[Pretrainer, dict]:
    """Pretrain as the recipe says; returns the trained module and the trainer's final state."""
    if not recipe.objectives.enabled():
        raise UserError(f"{source}: no objective enabled; set objectives.mae.weight (or electra/metric) above 0")
    if recipe.tracking not in TRACKERS:
        raise UserError(f"{source}: tracking: unknown tracker {recipe.tracking!r}; use one of {', '.join(TRACKERS)}")
    data = recipe.data
    urls = [url for spec in data.shards for url in shard_urls(spec)]
    output_dir = Path(recipe.output_dir)
    set_seed(recipe.train.seed)  # the same initial weights on every rank
    config = backbone_config(recipe, source=source)
    try:
        model = Pretrainer(backbone=config, objectives=recipe.objectives)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None

    def batches(epoch: int):
        return train_batches(
            urls, batch_size=recipe.train.batch_size, clip_seconds=data.clip_seconds,
            sample_rate=config.frontend.sample_rate, mix_max=data.mix_max, mix_probability=data.mix_probability,
            same_genre_mix=data.same_genre_mix, views=data.views, shuffle_buffer=data.shuffle_buffer,
            batches_per_epoch=data.batches_per_epoch, num_workers=data.num_workers, seed=recipe.train.seed,
            epoch=epoch, bad_shards=data.bad_shards,
        )

    def export(trained: Pretrainer, directory: Path) -> None:
        state = json.loads((directory / "trainer_state.json").read_text())
        save_pretrained(trained.backbone, directory / "backbone", card={
            "name": recipe.run_name or f"Timbre {recipe.model.size} ({' + '.join(recipe.objectives.enabled())})",
            "data": list(data.shards),
            "objectives": {name: f"weight {getattr(recipe.objectives, name).weight}"
                           for name in recipe.objectives.enabled()},
            "steps": state["step"],
            "metrics": {name: round(value, 5) for name, value in state["logs"].items()} or None,
            "recipe": to_dict(recipe),
        })

    trained = train(
        model=model, loss_fn=lambda module, batch, step: module(batch), batches=batches, config=recipe.train,
        output_dir=output_dir, tracking=recipe.tracking, run_name=recipe.run_name, recipe=to_dict(recipe),
        resume=recipe.resume, param_groups=param_groups(model, backbone=model.backbone, lr=recipe.train.lr,
                                                                weight_decay=recipe.train.weight_decay), export=export,
        images=lambda module, batch: module.images(batch),
    )
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return trained, state


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="python -m pretrain", description="Pretrain a spectrogram transformer from a YAML recipe."
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/pretrain/mae-tiny-synth.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides, PretrainRecipe)
    _, state = run(recipe, source=args.recipe)
    if PartialState().is_main_process:
        logs = state["logs"]
        losses = ", ".join(f"{name} {logs[name]:.4f}" for name in ("mae", "electra", "metric") if name in logs)
        print(f"pretrained {state['step']} steps: loss {logs.get('loss', float('nan')):.4f} ({losses}), "
              f"{state['clips_per_s']:.1f} clips/s; backbone in {Path(recipe.output_dir) / 'backbone'}")
    return 0
