"""Backbones as Hugging Face folders that plain `transformers` loads as an `ASTModel`, and back.

A folder holds `config.json` (an `ASTConfig`), `model.safetensors` (AST checkpoint naming, the one
the public MIT checkpoints use; transformers 4 loads it as is and transformers 5 renames it on
load), `preprocessor_config.json` (an `ASTFeatureExtractor` computing exactly Timbre's features,
`max_length` = the backbone's `max_frames` so it does not pad a training-length clip) and a model
card. Nothing needs `trust_remote_code`. `load_backbone` reads such folders, local or on the Hub,
including AST checkpoints with overlapping patches (stride 10) and `ASTForAudioClassification`
checkpoints (the classifier is dropped). Weights are read from safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from einops import rearrange
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.errors import UserError
from pretrain.backbone import Backbone, BackboneConfig, ModelConfig
from pretrain.frontend import FrontendConfig

MODEL_TYPE = "audio-spectrogram-transformer"
CLASSIFIER_PREFIX = "audio_spectrogram_transformer."
FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

# transformers 5 names -> AST checkpoint names (what `ast_state_dict` writes); applied in order.
TRANSFORMERS5_NAMES = [
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.([qkv])_proj\.", lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def ast_config_dict(config: BackboneConfig) -> dict:
    """The `ASTConfig` fields that describe this backbone."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["ASTModel"],
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "patch_size": config.patch_size,
        "qkv_bias": True,
        "frequency_stride": config.frequency_stride,
        "time_stride": config.time_stride,
        "max_length": config.max_frames,
        "num_mel_bins": config.num_mel_bins,
    }


def feature_extractor_dict(config: BackboneConfig) -> dict:
    """An `ASTFeatureExtractor` configuration that reproduces `pretrain.frontend.LogMel` for this backbone."""
    frontend = config.frontend
    if (frontend.frame_length_ms, frontend.frame_shift_ms) != (25.0, 10.0):
        raise ValueError("ASTFeatureExtractor only computes 25 ms windows with a 10 ms hop; "
                         f"this frontend uses {frontend.frame_length_ms} ms / {frontend.frame_shift_ms} ms")
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": frontend.sample_rate,
        "num_mel_bins": frontend.num_mel_bins,
        "max_length": config.max_frames,
        "padding_value": 0.0,
        "do_normalize": True,
        "mean": frontend.mean,
        "std": frontend.std,
        "return_attention_mask": False,
    }


def ast_state_dict(backbone: Backbone, *, prefix: str = "") -> dict[str, Tensor]:
    """The backbone's weights under AST checkpoint names (`prefix` e.g. 'audio_spectrogram_transformer.')."""
    model = backbone
    weights = {
        "embeddings.cls_token": model.cls_token,
        "embeddings.distillation_token": model.dist_token,
        "embeddings.position_embeddings": torch.cat(
            [model.token_position[None], rearrange(model.grid_position, "f t d -> 1 (f t) d")], dim=1),
        "embeddings.patch_embeddings.projection.weight": model.patch_embed.projection.weight,
        "embeddings.patch_embeddings.projection.bias": model.patch_embed.projection.bias,
        "layernorm.weight": model.norm.weight,
        "layernorm.bias": model.norm.bias,
    }
    for i, block in enumerate(model.blocks):
        layer = f"encoder.layer.{i}."
        for name, part in zip(("query", "key", "value"), block.attention.qkv.weight.chunk(3)):
            weights[f"{layer}attention.attention.{name}.weight"] = part
        for name, part in zip(("query", "key", "value"), block.attention.qkv.bias.chunk(3)):
            weights[f"{layer}attention.attention.{name}.bias"] = part
        pairs = {"attention.output.dense": block.attention.proj, "intermediate.dense": block.mlp.fc1,
                 "output.dense": block.mlp.fc2, "layernorm_before": block.norm1, "layernorm_after": block.norm2}
        for name, module in pairs.items():
            weights[f"{layer}{name}.weight"] = module.weight
            weights[f"{layer}{name}.bias"] = module.bias
    return {prefix + name: tensor.detach().float().cpu().contiguous() for name, tensor in weights.items()}


def backbone_state_dict(weights: dict[str, Tensor], config: BackboneConfig) -> dict[str, Tensor]:
    """Inverse of `ast_state_dict`: AST checkpoint names (either transformers generation) -> Backbone names."""
    weights = {ast_name(name): tensor for name, tensor in weights.items()}
    grid_f, grid_t = config.grid(config.max_frames)
    positions = weights.pop("embeddings.position_embeddings")[0]
    state = {
        "cls_token": weights.pop("embeddings.cls_token"),
        "dist_token": weights.pop("embeddings.distillation_token"),
        "token_position": positions[:2],
        "grid_position": rearrange(positions[2:], "(f t) d -> f t d", f=grid_f, t=grid_t),
        "patch_embed.projection.weight": weights.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.projection.bias": weights.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": weights.pop("layernorm.weight"),
        "norm.bias": weights.pop("layernorm.bias"),
    }
    for i in range(config.num_layers):
        layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{block}attention.qkv.{kind}"] = torch.cat(
                [weights.pop(f"{layer}attention.attention.{name}.{kind}") for name in ("query", "key", "value")])
            pairs = {"attention.output.dense": "attention.proj", "intermediate.dense": "mlp.fc1",
                     "output.dense": "mlp.fc2", "layernorm_before": "norm1", "layernorm_after": "norm2"}
            for ast, ours in pairs.items():
                state[f"{block}{ours}.{kind}"] = weights.pop(f"{layer}{ast}.{kind}")
    if weights:
        raise KeyError(f"unexpected weights {sorted(weights)[:5]}")
    return state


def ast_name(name: str) -> str:
    """A weight name of ASTModel / ASTForAudioClassification in either transformers generation -> AST checkpoint name."""
    name = name.removeprefix(CLASSIFIER_PREFIX)
    for pattern, replacement in TRANSFORMERS5_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def save_pretrained(backbone: Backbone, directory: str | os.PathLike, *, card: dict | None = None) -> Path:
    """Write the Hub folder (config, safetensors weights, feature extractor, model card); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = backbone.config
    write_json(directory / "config.json", ast_config_dict(config))
    write_json(directory / "preprocessor_config.json", feature_extractor_dict(config))
    save_file(ast_state_dict(backbone), directory / "model.safetensors", metadata={"format": "pt"})
    model_card(config, card or {}).save(directory / "README.md")
    return directory


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(config: BackboneConfig, card: dict) -> ModelCard:
    """A model card from what the caller knows: data, objectives, recipe, steps, metrics (any may be missing)."""
    data = ModelCardData(library_name="transformers", pipeline_tag="feature-extraction", license=card.get("license"),
                         tags=["audio", "music", "instrument-recognition", "audio-spectrogram-transformer", "timbre"])
    frontend = config.frontend
    lines = [
        f"# {card.get('name', 'Timbre spectrogram transformer')}",
        "",
        "A self-supervised audio spectrogram transformer backbone for musical-instrument recognition, "
        "pretrained with Timbre and stored as a plain transformers `ASTModel`.",
        "",
        "## Model",
        "",
        f"- width {config.hidden_size}, depth {config.num_layers}, heads {config.num_heads}, MLP {config.intermediate_size}",
        f"- {config.patch_size}x{config.patch_size} patches, stride {config.frequency_stride} (frequency) x "
        f"{config.time_stride} (time), up to {config.max_frames} frames "
        f"({(config.max_frames - 1) * frontend.frame_shift_ms / 1000 + frontend.frame_length_ms / 1000:.2f} s)",
        f"- input: {frontend.num_mel_bins}-bin Kaldi log-mel at {frontend.sample_rate} Hz, "
        f"normalised with mean {frontend.mean} and std {frontend.std} (the included feature extractor)",
        "",
    ]
    for title, key in (("Initialised from", "initialised_from"), ("Data", "data"), ("Objectives", "objectives"),
                       ("Training", "steps"), ("Metrics", "metrics")):
        value = card.get(key)
        if value is None:
            continue
        lines += [f"## {title}", ""]
        if key == "steps":
            lines.append(f"{value} optimisation steps.")
        elif isinstance(value, dict):
            lines += [f"- {name}: {item}" for name, item in value.items()]
        elif isinstance(value, (list, tuple)):
            lines += [f"- {item}" for item in value]
        else:
            lines.append(str(value))
        lines.append("")
    if card.get("recipe") is not None:
        recipe = card["recipe"] if isinstance(card["recipe"], str) else json.dumps(card["recipe"], indent=2, default=str)
        lines += ["## Recipe", "", "```", recipe.rstrip(), "```", ""]
    lines += [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoFeatureExtractor, AutoModel",
        "",
        'extractor = AutoFeatureExtractor.from_pretrained("REPO")',
        'model = AutoModel.from_pretrained("REPO")',
        f"inputs = extractor(waveform, sampling_rate={frontend.sample_rate}, return_tensors=\"pt\")  # mono float waveform",
        "embedding = model(**inputs).pooler_output  # (batch, hidden)",
        "```",
        "",
        "With Timbre: `pretrain.hub.load_backbone(\"REPO\")`, or "
        "`python -m pretrain embed REPO song.wav --out embeddings.npz`.",
        "",
    ]
    text = "\n".join(lines).replace("REPO", card.get("repo_id", "PATH_OR_REPO_ID"))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def resolve(path_or_repo_id: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise the Hub snapshot of the repository's config, preprocessor and safetensors files."""
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    if Path(path_or_repo_id).exists() or path_or_repo_id.count("/") > 1 or path_or_repo_id.startswith((".", "/", "~")):
        raise UserError(f"{path_or_repo_id}: not a model folder; pass a folder with config.json and model.safetensors, "
                        "or a Hub id like MIT/ast-finetuned-audioset-10-10-0.4593")
    try:
        return Path(snapshot_download(path_or_repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{path_or_repo_id}: not a local folder and not in the Hub cache, and HF_HUB_OFFLINE is set; "
                            "unset it to download, or pass a local folder") from None
        raise UserError(f"{path_or_repo_id}: not a local folder, not in the Hub cache, and the Hugging Face Hub cannot "
                        "be reached (no network?); connect, or pass a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise UserError(f"{path_or_repo_id}: cannot fetch it from the Hugging Face Hub ({type(error).__name__}); "
                        "check the id, your network and `hf auth login` for private repositories") from None


def load_backbone(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Backbone:
    """A Backbone from a Timbre folder or any AST checkpoint (folder or Hub id), weights from safetensors only.

    `revision` picks a Hub branch, tag or commit, e.g. a `refs/pr/N` safetensors conversion of a pickle-only repo.
    """
    directory = resolve(str(path_or_repo_id), revision)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; a backbone folder needs config.json and model.safetensors "
                        "(write one with pretrain.hub.save_pretrained)")
    ast = json.loads(config_path.read_text())
    if ast.get("model_type") != MODEL_TYPE:
        raise UserError(f"{config_path}: model_type is {ast.get('model_type')!r}, not {MODEL_TYPE!r}; "
                        "pass an audio spectrogram transformer checkpoint")
    if ast.get("hidden_act", "gelu") != "gelu" or not ast.get("qkv_bias", True) or not isinstance(ast.get("patch_size", 16), int):
        raise UserError(f"{config_path}: only AST models with gelu, qkv biases and square patches load into Timbre")
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise UserError(f"{directory}: no .safetensors weights (found {found}); Timbre loads safetensors only, "
                        "convert the checkpoint with transformers' save_pretrained, or pick a Hub revision that has them")
    preprocessor_path = directory / "preprocessor_config.json"
    extractor = json.loads(preprocessor_path.read_text()) if preprocessor_path.is_file() else {}
    if extractor.get("feature_extractor_type", "ASTFeatureExtractor") != "ASTFeatureExtractor" or not extractor.get(
            "do_normalize", True):
        raise UserError(f"{preprocessor_path}: Timbre computes normalised ASTFeatureExtractor features only; "
                        "use an AST checkpoint whose extractor normalises (do_normalize true)")
    frontend = FrontendConfig(sample_rate=extractor.get("sampling_rate", 16000),
                              num_mel_bins=extractor.get("num_mel_bins", ast.get("num_mel_bins", 128)),
                              mean=extractor.get("mean", FrontendConfig.mean), std=extractor.get("std", FrontendConfig.std))
    try:
        config = BackboneConfig(
            hidden_size=ast.get("hidden_size", 768), num_layers=ast.get("num_hidden_layers", 12),
            num_heads=ast.get("num_attention_heads", 12), intermediate_size=ast.get("intermediate_size", 3072),
            patch_size=ast.get("patch_size", 16), frequency_stride=ast.get("frequency_stride", 10),
            time_stride=ast.get("time_stride", 10), num_mel_bins=ast.get("num_mel_bins", 128),
            max_frames=ast.get("max_length", 1024), layer_norm_eps=ast.get("layer_norm_eps", 1e-12),
            dropout=ast.get("hidden_dropout_prob", 0.0), frontend=frontend)
    except ValueError as error:
        raise UserError(f"{config_path}: {error}; fix it or re-export the folder") from None
    weights = {}
    for path in weight_files:
        weights.update({name: tensor for name, tensor in load_file(path).items()
                        if not name.startswith("classifier.")})
    backbone = Backbone(config)
    try:
        state = backbone_state_dict(weights, config)
        backbone.load_state_dict(state)
    except (KeyError, RuntimeError) as error:
        raise UserError(f"{weight_files[0]}: weights do not match {config_path.name} "
                        f"({str(error).splitlines()[0][:200]}); re-export the folder") from None
    return backbone.eval()


def load_for_training(path_or_repo_id: str, *, model: ModelConfig, sample_rate: int, frames: int, given: str,
                      source: str | os.PathLike) -> Backbone:
    """A saved backbone to train on `sample_rate` Hz clips of `frames` frames, its position grid cut to them (so its
    export has `max_length` = the training clip). `model.frequency_stride` / `model.time_stride` set beside it re-grid
    its patches (AST's way of fine-tuning non-overlapping ImageNet patches with overlapping ones): the same kernel
    slides with the new stride and the positions are resampled to the new patch centres (`regrid_positions`). `given`
    names the recipe key that brought it (`backbone=PATH`), for the one-line errors: other `model` overrides set beside
    it, another sample rate, clips longer than its grid, impossible strides."""
    if shaped := model.shaping():
        nulls = " ".join(f"{key}=null" for key in shaped)
        verb = "shapes" if len(shaped) == 1 else "shape"
        raise UserError(f"{source}: {', '.join(shaped)} {verb} a backbone trained from scratch, but {given} "
                        f"is given; drop one of the two (override {nulls})")
    backbone = load_backbone(path_or_repo_id)
    config = backbone.config
    if config.frontend.sample_rate != sample_rate:
        raise UserError(f"{source}: the backbone expects {config.frontend.sample_rate} Hz audio but data.sample_rate "
                        f"is {sample_rate}; set data.sample_rate to match")
    if frames > config.max_frames:
        raise UserError(f"{source}: the backbone takes at most {config.max_frames} frames but data.clip_seconds needs "
                        f"{frames}; lower data.clip_seconds")
    try:
        fitted = dataclasses.replace(config, max_frames=frames,
                                     frequency_stride=model.frequency_stride or config.frequency_stride,
                                     time_stride=model.time_stride or config.time_stride,
                                     dropout=config.dropout if model.dropout is None else model.dropout)
    except ValueError as error:
        raise UserError(f"{source}: model: {error}") from None
    if fitted == config:
        return backbone
    state = backbone.state_dict()
    state["grid_position"] = regrid_positions(state["grid_position"], old=config, new=fitted, frames=frames)
    regridded = Backbone(fitted)
    regridded.load_state_dict(state)
    return regridded


def regrid_positions(grid: Tensor, *, old: BackboneConfig, new: BackboneConfig, frames: int) -> Tensor:
    """(grid_f, grid_t, D) positions of `old`'s patches -> those of `new`'s patches over `frames` frames: each new patch
    takes the position linearly interpolated at its centre, in units of the old stride (patch i of stride s is
    centred on s*i + patch/2 on both grids, so new patch j sits at old index j * s_new / s_old). With the same strides
    that index is j itself, so the grid is only cut to `frames`, every value kept exactly."""
    grid_f, grid_t = new.grid(frames)
    at_f = torch.arange(grid_f, dtype=torch.float64) * new.frequency_stride / old.frequency_stride
    at_t = torch.arange(grid_t, dtype=torch.float64) * new.time_stride / old.time_stride

    def lerp(values: Tensor, at: Tensor, axis: int) -> Tensor:
        below = at.floor().long().clamp(max=values.shape[axis] - 1)
        above = (below + 1).clamp(max=values.shape[axis] - 1)
        weight = (at - below).to(values.dtype)
        shape = [1, 1, 1]
        shape[axis] = -1
        return (values.index_select(axis, below) * (1 - weight).view(shape)
                + values.index_select(axis, above) * weight.view(shape))

    return lerp(lerp(grid.double(), at_f, 0), at_t, 1).to(grid.dtype).contiguous()


def publish(directory: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
            token: str | None = None) -> list[str]:
    """Upload a backbone folder as one commit (creating the repository); returns the uploaded paths.

    `dry_run` only lists them. Without a token (argument, HF_TOKEN or `hf auth login`) it stops with a UserError.
    """
    directory = Path(directory)
    for name in FOLDER_FILES:
        if not (directory / name).is_file():
            raise UserError(f"{directory / name}: missing; publish a folder written by save_pretrained "
                            "(a training run's export/ folder)")
    files = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts))
    if dry_run:
        return files
    token = token or get_token()
    if not token:
        raise UserError(f"{directory}: no Hugging Face token to publish with; run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, repo_type="model", commit_message="Upload Timbre backbone",
                          operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=directory / name)
                                      for name in files])
    except HfHubHTTPError as error:
        raise UserError(f"{repo_id}: the Hub refused the upload ({str(error).splitlines()[0]}); "
                        "check the repository id and that your token can write to it") from None
    return files
