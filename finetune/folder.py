"""A fine-tuned model's folder: what `save_model` writes and `load_model` reads.

A model folder (`<output_dir>/model/`) holds:
- `backbone/`           the (LoRA-merged) backbone in the Hub format of `pretrain.hub` (plain AST, loadable alone)
- `head.safetensors`    the classification head; `adapters.safetensors` for bottleneck-adapter models
- `finetune.json`       labels, head and adaptation settings, clip length, hop, aggregation, thresholds, validation metrics
- `thresholds.json`     per-instrument decision thresholds (tuned on the validation split, or moved to a collection by
                        `finetune calibrate`)
- `README.md`           model card
- for a linear head on the pooled embedding without bottleneck adapters, also `config.json`, `model.safetensors` and
  `preprocessor_config.json`: an `ASTForAudioClassification` folder (id2label = instrument names, problem_type
  multi_label_classification, so transformers' audio-classification pipeline applies a sigmoid and gives Timbre's
  probabilities on a clip of the training length).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.errors import UserError
from core.trainer import PRECISION_CHOICES, PRECISIONS, resolve_precision
from finetune.adapters import AdaptConfig, attach_adapters, merged_backbone
from finetune.heads import Head, HeadConfig
from finetune.model import Classifier
from pretrain.backbone import Backbone
from pretrain.hub import ast_config_dict, ast_state_dict, feature_extractor_dict, load_backbone, save_pretrained
from shards.vocab import INSTRUMENT_NAMES, INSTRUMENTS

FORMAT = "timbre-finetune"


@dataclass
class ModelInfo:
    """What `finetune.json` records next to the weights."""

    labels: list[str]
    head: HeadConfig
    adapt: AdaptConfig
    clip_seconds: float
    sample_rate: int
    hop_seconds: float
    aggregate: str
    thresholds: list[float]
    validation: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # set by `finetune calibrate`: the collection, the match
    format: str = FORMAT


@dataclass
class FinetunedModel:
    """A loaded model folder: the classifier in eval mode plus everything needed to turn audio into decisions."""

    classifier: Classifier
    info: ModelInfo
    path: str = ""  # the folder it was loaded from
    precision: str = "fp32"  # backbone and head under autocast at inference; log-mel features stay fp32

    @property
    def window(self) -> int:
        return round(self.info.clip_seconds * self.info.sample_rate)

    def hop(self, hop_seconds: float | None = None) -> int:
        """Window hop in samples: `hop_seconds`, or the one the model was saved with."""
        if hop_seconds is not None and hop_seconds <= 0:
            raise UserError(f"--hop-seconds must be positive; got {hop_seconds}")
        return max(1, round((hop_seconds or self.info.hop_seconds) * self.info.sample_rate))

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device


def exportable(classifier: Classifier) -> bool:
    """True when transformers' ASTForAudioClassification computes exactly this classifier."""
    return classifier.head.exportable and classifier.adapters is None


def save_model(classifier: Classifier, directory: Path, info: ModelInfo, *, card: dict | None = None) -> Path:
    """Write the model folder (see the module docstring); LoRA is merged into a copy, the classifier is untouched."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone = merged_backbone(classifier.backbone).eval()
    save_pretrained(backbone, directory / "backbone", card=card)
    save_file(_contiguous(classifier.head.state_dict()), directory / "head.safetensors")
    adapters = directory / "adapters.safetensors"
    if classifier.adapters is not None:
        save_file(_contiguous(classifier.adapters.state_dict()), adapters)
    else:
        adapters.unlink(missing_ok=True)
    (directory / "finetune.json").write_text(json.dumps(dataclasses.asdict(info), indent=1) + "\n")
    thresholds = dict(zip(info.labels, info.thresholds))
    (directory / "thresholds.json").write_text(json.dumps(thresholds, indent=1) + "\n")
    exported = ("config.json", "model.safetensors", "preprocessor_config.json")
    if exportable(classifier):
        _export_transformers(backbone, classifier.head, directory, info)
    else:
        for name in exported:
            (directory / name).unlink(missing_ok=True)
    model_card(info, exportable(classifier), card or {}).save(directory / "README.md")
    return directory


def _export_transformers(backbone: Backbone, head: Head, directory: Path, info: ModelInfo) -> None:
    names = [INSTRUMENT_NAMES[code] for code in info.labels]
    config = ast_config_dict(backbone.config)
    config.update(architectures=["ASTForAudioClassification"], problem_type="multi_label_classification",
                  id2label={str(i): name for i, name in enumerate(names)},
                  label2id={name: i for i, name in enumerate(names)})
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    state = dict(ast_state_dict(backbone, prefix="audio_spectrogram_transformer."))
    state.update({f"classifier.{name}": value for name, value in head.classifier.state_dict().items()})
    save_file(_contiguous(state), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "preprocessor_config.json").write_text(json.dumps(feature_extractor_dict(backbone.config), indent=1) + "\n")


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in state.items()}


def load_model(path: str | Path, *, device: str | torch.device | None = None, precision: str = "fp32") -> FinetunedModel:
    """Load a model folder written by `save_model`, in eval mode on `device` (default: CUDA when available).

    `precision` bf16 (CPUs with AVX512-BF16, recent GPUs) or fp16 (GPUs) runs inference under autocast; auto picks
    bf16 where the device multiplies it natively, as training does, else fp32.
    """
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in PRECISION_CHOICES:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, auto; got {precision!r}")
    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA GPU and this run is on {device.type}; use bf16 or fp32")
    info = read_info(path)
    backbone = load_backbone(str(path / "backbone"))
    adapters = attach_adapters(backbone, info.adapt) if (path / "adapters.safetensors").is_file() else None
    classifier = Classifier(backbone=backbone, head=info.head, classes=len(info.labels), adapters=adapters)
    classifier.head.load_state_dict(load_file(path / "head.safetensors"))
    if adapters is not None:
        adapters.load_state_dict(load_file(path / "adapters.safetensors"))
    return FinetunedModel(classifier=classifier.to(device).eval(), info=info, path=str(path), precision=precision)


def read_info(path: str | Path) -> ModelInfo:
    """The `finetune.json` of a model folder."""
    meta_file = Path(path) / "finetune.json"
    if not meta_file.is_file():
        raise UserError(f"{path}: not a Timbre fine-tuned model folder (no finetune.json); pass <output_dir>/model "
                        f"of a `python -m finetune RECIPE.yaml` run")
    meta = json.loads(meta_file.read_text())
    return ModelInfo(**{**meta, "head": HeadConfig(**meta["head"]), "adapt": AdaptConfig(**meta["adapt"])})


def load_head(classifier: Classifier, path: str | Path, info: ModelInfo, *, head: HeadConfig, source: str) -> None:
    """Copy the head of model folder `path` (whose `finetune.json` is `info`) into `classifier`'s head (built from
    `head`, the recipe's), so a run continues from a fine-tuned model; the labels and the head's kind, pooling and
    width must match."""
    path = Path(path)
    if info.labels != list(INSTRUMENTS):
        raise UserError(f"{path}: its labels ({' '.join(info.labels)}) are not Timbre's ({' '.join(INSTRUMENTS)}); "
                        f"start from its backbone instead (backbone={path / 'backbone'})")
    fields = ("kind", "pooling") + (("hidden",) if head.kind in ("mlp", "fluffy") else ())
    differ = [f"head.{name}={getattr(info.head, name)}" for name in fields if getattr(info.head, name) != getattr(head, name)]
    if differ:
        raise UserError(f"{source}: init_from={path} has another head; override {' '.join(differ)} to continue from it, "
                        f"or start from its backbone alone (backbone={path / 'backbone'})")
    if (path / "adapters.safetensors").is_file():
        raise UserError(f"{path}: a model with bottleneck adapters cannot be continued; start from its backbone "
                        f"(backbone={path / 'backbone'})")
    classifier.head.load_state_dict(load_file(path / "head.safetensors"))


def model_card(info: ModelInfo, transformers_folder: bool, card: dict) -> ModelCard:
    names = ", ".join(f"{code} ({INSTRUMENT_NAMES[code]})" for code in info.labels)
    thresholds = "\n".join(f"| {code} | {value:.3f} |" for code, value in zip(info.labels, info.thresholds))
    metrics = "\n".join(f"- {name}: {value:.4f}" for name, value in info.validation.items()
                        if isinstance(value, (int, float)))
    recipe = card.get("recipe")
    data = ModelCardData(library_name="transformers" if transformers_folder else "timbre",
                         pipeline_tag="audio-classification" if transformers_folder else None,
                         tags=["audio-classification", "musical-instrument-recognition", "irmas", "timbre"])
    lines = [
        "# Timbre instrument classifier", "",
        f"Multi-label instrument recognition ({len(info.labels)} IRMAS instruments: {names}).",
        f"Head: `{info.head.kind}` on `{info.head.pooling}` pooling; adaptation: `{info.adapt.mode}`; "
        f"trained on {info.clip_seconds:g} s clips at {info.sample_rate} Hz. Whole files are cut into "
        f"{info.clip_seconds:g} s windows every {info.hop_seconds:g} s and window probabilities are aggregated by "
        f"`{info.aggregate}`.", "",
        "## Decision thresholds (tuned on the validation split)", "", "| instrument | threshold |", "|---|---|",
        thresholds, "",
        "## Validation metrics", "", metrics or "- (no validation split)", "",
        "## Use", "", "```bash", "python -m finetune predict MODEL_DIR song.wav --timeline",
        "python -m finetune evaluate MODEL_DIR IRMAS-TestingData-Part1 --out report", "```",
    ]
    if transformers_folder:
        lines += ["", "This folder is also a transformers `ASTForAudioClassification` checkpoint (sigmoid outputs):", "",
                  "```python", "import soundfile as sf", "from transformers import pipeline", "",
                  "classify = pipeline('audio-classification', model='MODEL_DIR')",
                  "audio, rate = sf.read('clip.wav', dtype='float32', always_2d=True)  # decoded without FFmpeg",
                  "answer = classify({'raw': audio.mean(axis=1), 'sampling_rate': rate}, top_k=None)", "```", "",
                  "(`classify('clip.wav')` also works where FFmpeg is installed: transformers decodes file names with it.)",
                  "", f"Give it {info.clip_seconds:g} s clips; longer audio is better served by `python -m finetune predict`."]
    if recipe:
        lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=1, default=str), "```"]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")
