"""`python -m finetune RECIPE.yaml [key=value ...]` (also under `accelerate launch -m finetune ...`).

Builds the classifier (a pretrained or from-scratch backbone, the chosen head and adaptation), streams mixed IRMAS-train
clips (2-3 clips summed with their labels unioned, SpecAugment, random gain) through `core.trainer.train`, and
exports `<output_dir>/model/` at every checkpoint and at the end, with per-instrument thresholds tuned on `data.val`.
With a `consistency` section, each step also learns from unlabeled clips seen as two views (ConsistencyConfig).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import nn

from core.errors import UserError
from core.recipe import recipe_from_argv, to_dict
from core.trainer import TrainConfig, check_output_dir, resolve_precision, train
from finetune.adapters import AdaptConfig, prepare
from finetune.folder import FinetunedModel, ModelInfo, load_head, read_info, save_model
from finetune.heads import HeadConfig
from finetune.inference import AGGREGATES, Aggregate, infer
from finetune.losses import LossConfig, MultiLabelLoss, label_counts, pos_weight_from_counts, view_agreement
from finetune.metrics import HEADLINE, multilabel_metrics, positive_rates, tune_thresholds
from finetune.model import Classifier
from pretrain.augment import WaveAugment, WaveAugmentConfig
from pretrain.backbone import Backbone, ModelConfig, param_groups
from pretrain.frontend import FrontendConfig, SpecAugment, check_warp
from pretrain.hub import load_for_training
from shards.loader import DataConfig, ViewSource, eval_samples, train_batches, validation_files, validation_mixtures
from shards.vocab import INSTRUMENTS


@dataclass
class AugmentConfig(WaveAugmentConfig):
    """Waveform levers (gain_db, filters, noise, pitch, reverb: see pretrain.augment), a frequency warp inside the
    log-mel (pretrain.frontend.LogMel: pitch shifting's effect at no cost), then SpecAugment and patchout."""

    spec_augment: bool = True
    freq_mask: int = 24
    time_mask: int = 48
    num_freq_masks: int = 2
    num_time_masks: int = 2
    patchout: float = 0.0  # fraction of patch tokens dropped at random in each training clip (PaSST); 0 keeps all
    warp: float = 0.0  # each training clip's mel frequencies stretched by up to +-warp (VTLP; pretrain.frontend)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.patchout < 1:
            raise ValueError(f"patchout is the fraction of patches dropped, in [0, 1); got {self.patchout}")
        check_warp(self.warp)


@dataclass
class ConsistencyConfig:
    """Semi-supervised fine-tuning on unlabeled audio: consistency between two views of a clip (the Pi-model of Laine
    and Aila 2017; the targets carry no gradient). Each step also draws `batch_size` unlabeled clips as two views and
    pulls the model's instrument probabilities on the first view towards its own probabilities on the second (soft
    binary cross-entropy), next to the supervised loss. With the channels of a `shards synth --pair-fonts` pool
    (packed with --channels 2) as the views, they are the same notes in two SoundFonts: the model learns predictions
    that do not change with the timbre the labels happen to show. Off while `weight` is 0."""

    weight: float = 0.0
    train: str | list[str] | None = None  # unlabeled shards (labels, if any, are not read)
    batch_size: int = 32
    view_source: ViewSource = "channels"  # the two views: a clip's channels at one crop, or two crops ("crops")
    # 0: soft targets (the second view's probabilities); c in (0.5, 1): FixMatch's hard targets where the second view
    # is sure (probability >= c or <= 1 - c), the other instruments ignored (finetune.losses.view_agreement)
    confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.batch_size < 1:
            raise ValueError(f"weight must be >= 0 and batch_size >= 1; got {self.weight} and {self.batch_size}")
        if self.confidence and not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence is 0 (soft targets) or a probability in (0.5, 1); got {self.confidence}")


ThresholdSource = Literal["mixtures", "files", "clips"]
THRESHOLD_SOURCES = get_args(ThresholdSource)


@dataclass
class EvalConfig:
    hop_seconds: float = 1.5  # window hop when files are longer than a clip
    aggregate: Aggregate = "mean"
    batch_size: int = 32
    # Per-instrument thresholds are tuned on validation mixtures of 1-4 clips, one window each (`mixtures`), on
    # 5-20 s validation files of 1-4 instruments scored window by window like test files (`files`), on both sets
    # together ([mixtures, files]), or on the single-instrument validation clips (`clips`), whose thresholds sit too
    # high for polyphonic files.
    thresholds: ThresholdSource | list[ThresholdSource] = "mixtures"
    mixtures: int = 0  # validation mixtures to build; 0: as many as there are validation clips
    files: int = 0  # validation files to build when thresholds use them; 0: half as many as there are validation clips
    best: str = "map"  # validation metric (of the threshold set) that picks the exported checkpoint; higher is better

    @property
    def threshold_sets(self) -> list[str]:
        """The validation sets whose scores, pooled, tune the thresholds."""
        return [self.thresholds] if isinstance(self.thresholds, str) else list(self.thresholds)

    @property
    def threshold_name(self) -> str:
        return "+".join(self.threshold_sets)


@dataclass
class FinetuneRecipe:
    backbone: str | None = None  # pretrained backbone folder or Hub id; omit to train from scratch
    # a fine-tuned model folder (<output_dir>/model of another run) to continue from: its backbone and its head, which
    # the recipe's head must match (kind, pooling, width); e.g. a model trained on `shards synth` clips, fine-tuned
    # on your own labels
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone trained from scratch (no `backbone`)
    output_dir: str = "runs/finetune"
    tracking: str = "none"
    run_name: str | None = None
    resume: str | None = None
    data: DataConfig = field(default_factory=lambda: DataConfig(mix_max=3))
    head: HeadConfig = field(default_factory=HeadConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_classifier(recipe: FinetuneRecipe, *, source: str = "recipe") -> Classifier:
    """Backbone (loaded or new, position grid fitted to the clip), adaptation and head, ready to train."""
    data = recipe.data
    frontend = FrontendConfig(sample_rate=data.sample_rate)
    frames = frontend.num_frames(round(data.clip_seconds * data.sample_rate))
    if recipe.init_from and recipe.backbone:
        raise UserError(f"{source}: init_from={recipe.init_from} brings its own backbone, but backbone={recipe.backbone} "
                        "is given too; drop one of the two (override backbone=null)")
    # a one-line error if init_from is not a model folder, before its backbone loads
    initial = read_info(recipe.init_from) if recipe.init_from else None
    pretrained = str(Path(recipe.init_from) / "backbone") if recipe.init_from else recipe.backbone
    if pretrained:
        given = f"init_from={recipe.init_from}" if recipe.init_from else f"backbone={recipe.backbone}"
        backbone = load_for_training(pretrained, model=recipe.model, sample_rate=data.sample_rate, frames=frames,
                                     given=given, source=source)
    else:
        try:
            backbone = Backbone(recipe.model.backbone_config(max_frames=frames, frontend=frontend))
        except ValueError as error:
            raise UserError(f"{source}: model: {error}") from None
    backbone = backbone.train()
    try:
        adapters = prepare(backbone, recipe.adapt)
    except ValueError as error:
        raise UserError(f"{source}: adapt: {error}") from None
    augment = recipe.augment
    spec_augment = SpecAugment(freq_mask=augment.freq_mask, time_mask=augment.time_mask,
                               num_freq_masks=augment.num_freq_masks,
                               num_time_masks=augment.num_time_masks) if augment.spec_augment else None
    try:
        classifier = Classifier(backbone=backbone, head=recipe.head, classes=len(INSTRUMENTS), adapters=adapters,
                                spec_augment=spec_augment, patchout=augment.patchout, warp=augment.warp)
    except ValueError as error:
        raise UserError(f"{source}: head: {error}") from None
    if initial:
        load_head(classifier, recipe.init_from, initial, head=recipe.head, source=source)
    return classifier


def validation_sets(recipe: FinetuneRecipe) -> dict[str, list[tuple[np.ndarray, torch.Tensor]]]:
    """(targets, audio) of the validation clips, of mixtures built from them and, when the thresholds use them, of
    files built from them; read once per run."""
    samples = list(eval_samples(recipe.data.val, rank=0, world_size=1, sample_rate=recipe.data.sample_rate))
    if not samples:
        raise UserError(f"{recipe.data.val}: validation shards hold no samples; pass data.val shards written with "
                        "--val-fraction")
    labelled = [sample for sample in samples if sample["labelled"]]
    if not labelled:
        raise UserError(f"{recipe.data.val}: validation shards carry no instrument labels; pass the val split of an "
                        "irmas-train or csv pack (shards pack ... --val-fraction)")
    chosen = {"clips": labelled,
              "mixtures": validation_mixtures(labelled, count=recipe.eval.mixtures or None, seed=recipe.train.seed)}
    if "files" in recipe.eval.threshold_sets:
        chosen["files"] = validation_files(labelled, count=recipe.eval.files or None, seed=recipe.train.seed)
    return {name: [(sample["targets"].numpy(), sample["audio"]) for sample in examples]
            for name, examples in chosen.items()}


def predict_set(classifier: Classifier, info: ModelInfo, examples, *, batch_size: int,
                precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """File-level probabilities and targets of (targets, audio) examples, in eval mode, at `precision`."""
    model = FinetunedModel(classifier=classifier, info=info, precision=precision)
    was_training = classifier.training
    classifier.eval()
    probabilities, targets = [], []
    for target, result in infer(model, examples, batch_size=batch_size):
        probabilities.append(result.aggregate(info.aggregate))
        targets.append(target)
    classifier.train(was_training)
    return np.stack(probabilities), np.stack(targets)


def bce(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy of file-level probabilities (the validation loss)."""
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def model_info(recipe: FinetuneRecipe) -> ModelInfo:
    data = recipe.data
    return ModelInfo(labels=list(INSTRUMENTS), head=recipe.head, adapt=recipe.adapt, clip_seconds=data.clip_seconds,
                     sample_rate=data.sample_rate, hop_seconds=recipe.eval.hop_seconds,
                     aggregate=recipe.eval.aggregate, thresholds=[0.5] * len(INSTRUMENTS))


def exporter(recipe: FinetuneRecipe, output_dir: Path, *, resumed: bool, sets: dict | None):
    """The trainer's export hook: score the validation `sets` (from `validation_sets`, None without data.val), tune
    thresholds, and write `<output_dir>/model/` when the checkpoint is the best so far by `eval.best`; returns the
    metrics to log."""
    previous = output_dir / "model" / "finetune.json"  # a resumed run keeps the best model it already exported
    best = json.loads(previous.read_text()).get("validation", {}).get("best") if resumed and previous.is_file() else None

    def export(classifier: nn.Module, output_dir: Path, state: dict) -> dict[str, float]:
        nonlocal best
        info = model_info(recipe)
        logged: dict[str, float] = {}
        if sets is not None:
            # validation runs at the training precision: bf16 scores the same as fp32 here, 1.5x faster on CPUs with it
            precision = resolve_precision(recipe.train.precision, next(classifier.parameters()).device)
            scored = {name: predict_set(classifier, info, examples, batch_size=recipe.eval.batch_size,
                                        precision=precision)
                      for name, examples in sets.items() if examples}
            chosen = recipe.eval.threshold_sets
            pooled = tuple(np.concatenate([scored[name][i] for name in chosen]) for i in range(2))
            thresholds = tune_thresholds(*pooled)
            # the threshold set's scores unprefixed; each other set (and each pooled one) under its name
            named = [("", pooled)] + [(f"{name}_", scores) for name, scores in scored.items() if [name] != chosen]
            for prefix, (probabilities, targets) in named:
                metrics = multilabel_metrics(probabilities, targets, thresholds, info.labels)
                logged |= {f"{prefix}loss": bce(probabilities, targets)}
                logged |= {f"{prefix}{key}": metrics[key] for key in HEADLINE}
            info.thresholds = thresholds.tolist()
            score = logged[recipe.eval.best]
            if best is not None and score <= best["value"] and state["step"] != best["step"]:
                logged["best"] = best["value"]
                return logged
            best = {"metric": recipe.eval.best, "value": score, "step": state["step"]}
            logged["best"] = score
            info.validation = {**logged, "count": len(pooled[1]), "step": state["step"],
                               "thresholds_from": recipe.eval.threshold_name, "precision": precision, "best": best,
                               **positive_rates(pooled[0], thresholds)}
        card = {"recipe": to_dict(recipe), "steps": state["step"]}
        save_model(classifier, output_dir / "model", info, card=card)
        return logged

    return export


def run(recipe: FinetuneRecipe, *, source: str = "recipe") -> Path:
    """Fine-tune as the recipe says; returns the model folder."""
    data = recipe.data
    if data.views != 1:
        raise UserError(f"{source}: data.views={data.views}: fine-tuning takes one crop per clip; set data.views=1")
    if not data.train:
        raise UserError(f"{source}: data.train is missing; pass data.train=SHARD_DIR (e.g. demo/shards/irmas-train/train)")
    if recipe.eval.aggregate not in AGGREGATES:
        raise UserError(f"{source}: eval.aggregate must be one of {', '.join(AGGREGATES)}; got {recipe.eval.aggregate!r}")
    if not recipe.eval.threshold_sets or not set(recipe.eval.threshold_sets) <= set(THRESHOLD_SOURCES):
        raise UserError(f"{source}: eval.thresholds must be one of {', '.join(THRESHOLD_SOURCES)} or a list of them "
                        f"(e.g. [mixtures, files]); got {recipe.eval.thresholds!r}")
    consistency = recipe.consistency
    if consistency.weight and not consistency.train:
        raise UserError(f"{source}: consistency.weight={consistency.weight} needs unlabeled shards; pass "
                        "consistency.train=SHARD_DIR (e.g. a `shards synth --pair-fonts` pool packed with --channels 2)")
    if recipe.eval.best not in HEADLINE:
        raise UserError(f"{source}: eval.best must be one of {', '.join(HEADLINE)}; got {recipe.eval.best!r}")
    output_dir = Path(recipe.output_dir)
    check_output_dir(output_dir, recipe.resume)
    # Read (and check) the validation set before the first step, not at the first checkpoint; the main process scores it.
    # (RANK, not PartialState: the process group is made later, by the trainer's Accelerator, with its CPU settings)
    sets = validation_sets(recipe) if data.val and int(os.environ.get("RANK", "0")) == 0 else None
    set_seed(recipe.train.seed)  # the same head (and scratch backbone) initialisation on every run and every rank
    classifier = build_classifier(recipe, source=source)
    pos_weight = None
    if recipe.loss.pos_weight:
        counts, total = label_counts(data.train)
        pos_weight = pos_weight_from_counts(counts, total, maximum=recipe.loss.max_pos_weight)
    criterion = MultiLabelLoss(config=recipe.loss, pos_weight=pos_weight)
    augment = WaveAugment(config=recipe.augment, sample_rate=data.sample_rate).train()
    warmup = recipe.adapt.warmup_head_steps

    def loss_fn(model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        audio, grad = augment(batch["audio"]), 0.0 if step < warmup else 1.0
        views = augment(batch["unlabeled"]) if "unlabeled" in batch else None  # (B', 2, samples), coloured apart
        # the labelled clips and the first views in one forward, so DDP sees one backward
        logits = model(audio if views is None else torch.cat([audio, views[:, 0]]), backbone_grad=grad)
        criterion.to(logits.device)
        supervised = criterion(logits[: len(audio)], batch["targets"], batch["labelled"])
        if views is None:
            return supervised, {}
        with torch.no_grad():
            target = torch.sigmoid(model(views[:, 1]).float())
        agreement = view_agreement(logits[len(audio):], target, confidence=consistency.confidence)
        return supervised + consistency.weight * agreement, {"supervised": supervised.detach(),
                                                             "consistency": agreement.detach()}

    cache = data.sample_cache()

    def batches(epoch: int):
        labelled = data.batches(batch_size=recipe.train.batch_size, seed=recipe.train.seed, epoch=epoch, cache=cache)
        if not consistency.weight:
            return labelled
        unlabeled = train_batches(consistency.train, batch_size=consistency.batch_size, views=2,
                                  view_source=consistency.view_source, clip_seconds=data.clip_seconds,
                                  sample_rate=data.sample_rate, shuffle_buffer=data.shuffle_buffer,
                                  batches_per_epoch=len(labelled), bad_shards=data.bad_shards,
                                  seed=recipe.train.seed, epoch=epoch)
        return ({**batch, "unlabeled": pool["audio"]} for batch, pool in zip(labelled, unlabeled))

    layer_decay = recipe.adapt.layer_decay if recipe.adapt.mode == "full" else 1.0
    groups = param_groups(classifier, backbone=classifier.backbone, lr=recipe.train.lr,
                          weight_decay=recipe.train.weight_decay, layer_decay=layer_decay)
    train(model=classifier, loss_fn=loss_fn, batches=batches, config=recipe.train, output_dir=output_dir,
          tracking=recipe.tracking, run_name=recipe.run_name, recipe=to_dict(recipe), resume=recipe.resume,
          param_groups=groups, export=exporter(recipe, output_dir, resumed=bool(recipe.resume), sets=sets))
    return output_dir / "model"


def main(argv: list[str]) -> int:
    """Fine-tune a backbone (a saved folder, a Hub id, or a named size from scratch) from a YAML recipe."""
    given = recipe_from_argv(argv, FinetuneRecipe, prog="python -m finetune", description=main.__doc__,
                             example="recipes/finetune/cpu-synth.yaml")
    if given is None:
        return 0
    path, recipe = given
    model_dir = run(recipe, source=path)
    meta_file = model_dir / "finetune.json"
    if meta_file.is_file() and int(os.environ.get("RANK", "0")) == 0:
        validation = json.loads(meta_file.read_text()).get("validation") or {}
        numbers = "  ".join(f"{name} {validation[name]:.3f}" for name in HEADLINE if name in validation)
        where = (f" (best {validation['best']['metric']} at step {validation['step']}, thresholds tuned on validation "
                 f"{validation['thresholds_from']})") if numbers else ""
        print(f"model: {model_dir}" + (f"\nvalidation: {numbers}{where}" if numbers else
                                       "\nvalidation: none (no data.val); thresholds left at 0.5"))
    return 0

