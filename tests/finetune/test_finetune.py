"""Fine-tuning on real tar shards with a small real backbone: heads, adaptation modes, export, evaluation, predict."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.trainer import cpu_has_bf16
from finetune.folder import load_model, save_model
from finetune.heads import Head, HeadConfig
from finetune.losses import MultiLabelLoss, label_counts, pos_weight_from_counts
from finetune.metrics import multilabel_metrics, tune_thresholds
from finetune.train import FinetuneRecipe, build_classifier, exporter, model_info, predict_set, run, validation_sets
from pretrain.backbone import Backbone, BackboneConfig, param_groups
from pretrain.encoder import cut_windows, window_starts
from pretrain.hub import save_pretrained
from shards.inputs import read_mono
from shards.loader import train_batches
from shards.vocab import GENRES, INSTRUMENT_NAMES, INSTRUMENTS

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
CLIP = 1.0


def chord(codes, *, seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A harmonic tone per instrument at an instrument-specific pitch, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    audio = sum(np.sin(2 * np.pi * 150 * 1.25 ** INSTRUMENTS.index(code) * h * t + rng.random() * 6) / h
                for code in codes for h in (1, 2, 3))
    return (0.3 * audio / max(1, len(codes)) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def clips(directory: Path, items: list[tuple[str, ...]], *, seed: int) -> list[dict]:
    """A 3 s `chord` sample per item (labelled with its codes), keyed after the shard folder."""
    return [dict(key=f"{directory.name}-{index:04d}", audio=chord(codes, seconds=3.0, seed=seed + index),
                 sample_rate=RATE, instruments=codes, genre=GENRES[index % len(GENRES)])
            for index, codes in enumerate(items)]


@pytest.fixture(scope="module")
def data(write_shard, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    train = write_shard(root / "train", clips(root / "train", [(code,) for code in INSTRUMENTS for _ in range(3)], seed=0))
    val = write_shard(root / "val", clips(root / "val", [(code,) for code in INSTRUMENTS for _ in range(2)], seed=1000))
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = BackboneConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_frames=298)
    return save_pretrained(Backbone(config), tmp_path_factory.mktemp("backbone"))


def recipe_for(backbone_dir: Path, data: dict, **sections) -> FinetuneRecipe:
    recipe = FinetuneRecipe(backbone=str(backbone_dir))
    recipe.data.train, recipe.data.val = str(data["train"]), str(data["val"])
    recipe.data.clip_seconds = CLIP  # 1 s windows keep the tests fast; the shards hold 3 s clips
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(recipe, section), key, value)
    return recipe


CASES = {
    "linear-probe": dict(head__kind="linear", adapt__mode="probe"),
    "linear-mean-probe": dict(head__kind="linear", head__pooling="mean", adapt__mode="probe"),
    "mlp-full-lrd": dict(head__kind="mlp", adapt__mode="full", adapt__layer_decay=0.5),
    "fluffy-attention-adapter": dict(head__kind="fluffy", head__pooling="attention", adapt__mode="adapter"),
    "fluffy-parallel-adapter-focal": dict(head__kind="fluffy", adapt__mode="adapter", adapt__adapter_style="parallel",
                                          loss__kind="focal", loss__label_smoothing=0.1),
    "linear-lora": dict(head__kind="linear", adapt__mode="lora"),
    "linear-max-full-patchout": dict(head__kind="linear", head__pooling="max", augment__patchout=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_head_and_mode_train_and_loss_falls(case, data, backbone_dir, tmp_path):
    torch.manual_seed(0)
    recipe = recipe_for(backbone_dir, data, **CASES[case])
    classifier = build_classifier(recipe)
    counts, total = label_counts(data["train"])
    criterion = MultiLabelLoss(config=recipe.loss, pos_weight=pos_weight_from_counts(counts, total, maximum=10.0))
    batch = next(iter(train_batches(str(data["train"]), batch_size=8, clip_seconds=CLIP, mix_max=3,
                                    mix_probability=0.5, seed=0)))
    frozen = {name: p.detach().clone() for name, p in classifier.backbone.named_parameters() if "lora_" not in name}
    optimizer = torch.optim.AdamW(param_groups(classifier, backbone=classifier.backbone, lr=3e-3, weight_decay=0.01,
                                               layer_decay=recipe.adapt.layer_decay))

    def loss() -> float:
        classifier.eval()
        with torch.no_grad():
            value = float(criterion(classifier(batch["audio"]), batch["targets"]))
        classifier.train()
        return value

    before = loss()
    for _ in range(20):
        criterion(classifier(batch["audio"]), batch["targets"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = loss()
    assert after < 0.7 * before, (before, after)

    mode = recipe.adapt.mode
    changed = [name for name, p in classifier.backbone.named_parameters()
               if name in frozen and not torch.equal(p, frozen[name])]
    if mode in ("probe", "adapter", "lora"):
        assert changed == []  # the pretrained weights are untouched
    else:
        assert changed
    if mode in ("adapter", "lora"):
        backbone_size = sum(p.numel() for name, p in classifier.backbone.named_parameters() if name in frozen)
        extra = classifier.adapters.parameters() if mode == "adapter" else (
            p for name, p in classifier.backbone.named_parameters() if "lora_" in name)
        extra = list(extra)
        assert all(p.requires_grad for p in extra)
        assert 0 < sum(p.numel() for p in extra) < 0.2 * backbone_size
        assert any(p.abs().sum() > 0 for p in extra if p.dim() == 2)

    # The saved folder (LoRA merged, adapters stored beside the backbone) gives the trained model's probabilities.
    classifier.eval()
    info = model_info(recipe)
    save_model(classifier, tmp_path / "model", info)
    loaded = load_model(tmp_path / "model", device="cpu")
    expected, _ = classifier.predict(batch["audio"])
    actual, _ = loaded.classifier.predict(batch["audio"])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    exportable = recipe.head.kind == "linear" and recipe.head.pooling == "cls" and mode != "adapter"
    assert (tmp_path / "model" / "config.json").is_file() == exportable


@pytest.mark.parametrize("pooling, expected", [
    ("max", [[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]),
    ("meanmax", [[0.0, 6.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]]),
])
def test_max_poolings_keep_the_largest_patch_token(pooling, expected):
    head = Head(config=HeadConfig(kind="linear", pooling=pooling), dim=4, classes=2)
    tokens = torch.zeros(2, 5, 4)
    tokens[0, 2, 1] = 5.0  # one patch holds a feature: mean 1, max 5
    tokens[1, :, 3] = -1.0  # every patch holds it negatively: mean -1, max -1
    pooled = head.pooled(tokens, torch.zeros(2, 4))
    torch.testing.assert_close(pooled, torch.tensor(expected))


def test_patchout_drops_patches_while_training_only(data, backbone_dir):
    classifier = build_classifier(recipe_for(backbone_dir, data, augment__patchout=0.75))
    tokens = []
    classifier.backbone.blocks[0].register_forward_hook(lambda module, inputs, output: tokens.append(inputs[0].shape[1]))
    audio = torch.from_numpy(np.stack([chord(("pia",), seconds=CLIP, seed=seed) for seed in range(2)]))
    classifier.train()(audio)
    classifier.eval()(audio)
    grid_f, grid_t = classifier.backbone.grid(classifier.frontend.num_frames(audio.shape[1]))
    patches = grid_f * grid_t
    assert tokens == [2 + patches - round(0.75 * patches), 2 + patches]  # cls + distillation + the kept patches


@pytest.mark.parametrize(("override", "message"), [
    ("augment.patchout=1", "patchout is the fraction of patches dropped, in [0, 1); got 1.0"),
    ("augment.warp=0.5", "warp is the largest relative frequency stretch, in [0, 0.5); got 0.5"),
])
def test_patchout_or_warp_out_of_range_is_a_one_line_recipe_error(data, run_module, tmp_path, override, message):
    result = run_module("finetune", "recipes/finetune/cpu-synth.yaml", f"data.train={data['train']}",
                        f"data.val={data['val']}", f"output_dir={tmp_path}", override)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: recipes/finetune/cpu-synth.yaml: augment: {message}"
    assert not any(tmp_path.iterdir())


def test_a_pretrained_backbone_with_scratch_shape_overrides_is_a_one_line_recipe_error(data, backbone_dir, run_module,
                                                                                       tmp_path):
    result = run_module("finetune", "recipes/finetune/cpu-synth.yaml", f"backbone={backbone_dir}",
                        f"data.train={data['train']}", f"data.val={data['val']}", f"output_dir={tmp_path}",
                        "model.num_layers=3")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: recipes/finetune/cpu-synth.yaml: model.num_layers shapes a backbone trained from scratch, but "
        f"backbone={backbone_dir} is given; drop one of the two (override model.num_layers=null)"]
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def cli_run(data, backbone_dir, run_module, tmp_path_factory) -> tuple[Path, str]:
    """(output_dir, stdout) of a linear-head LoRA model trained through the CLI with the shipped lora recipe."""
    output = tmp_path_factory.mktemp("run")
    result = run_module("finetune", "recipes/finetune/lora.yaml", f"backbone={backbone_dir}", f"data.train={data['train']}",
            f"data.val={data['val']}", f"output_dir={output}", "data.shuffle_buffer=32", "train.steps=12",
            "train.batch_size=8", "train.warmup_steps=2", "train.checkpoint_every=6", "adapt.warmup_head_steps=3",
            "train.lr=3e-3", f"data.clip_seconds={CLIP}", "eval.hop_seconds=0.5", "tracking=tensorboard",
            "augment.filters=0.5", "augment.noise=0.5", "augment.reverb=0.5", "augment.pitch=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout + result.stderr


def test_consistency_adds_the_agreement_of_two_views_of_unlabeled_clips(data, backbone_dir, write_shard, run_module,
                                                                        tmp_path):
    """consistency: each step also sees unlabeled two-channel clips (the channels as the two views, as a
    `--pair-fonts` pool gives them) and adds weight x their soft-target agreement to the supervised loss."""
    def two_timbres(audio: np.ndarray) -> np.ndarray:
        return np.stack([audio, np.convolve(audio, np.ones(8) / 8, mode="same").astype(np.float32)], axis=1)

    pool = write_shard(tmp_path / "pool", [dict(key=f"pool-{i:04d}", sample_rate=RATE,
                                                audio=two_timbres(chord((code,), seconds=3.0, seed=500 + i)))
                                           for i, code in enumerate(INSTRUMENTS * 2)], source="folder")
    common = ["recipes/finetune/lora.yaml", f"backbone={backbone_dir}", f"data.train={data['train']}",
              f"data.val={data['val']}", "data.shuffle_buffer=16", f"data.clip_seconds={CLIP}", "train.steps=4",
              "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=4", "train.log_every=4",
              "eval.mixtures=8", "eval.hop_seconds=0.5"]
    result = run_module("finetune", *common, f"output_dir={tmp_path / 'run'}", "consistency.weight=2.0",
                        f"consistency.train={pool}", "consistency.batch_size=3")
    assert result.returncode == 0, result.stderr[-3000:]
    logs = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["logs"]
    assert logs["consistency"] > 0 and logs["supervised"] > 0
    assert logs["loss"] == pytest.approx(logs["supervised"] + 2.0 * logs["consistency"], rel=1e-4)
    missing = run_module("finetune", *common, f"output_dir={tmp_path / 'missing'}", "consistency.weight=1.0")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "consistency.weight=1.0 needs unlabeled shards; pass consistency.train=SHARD_DIR" in missing.stderr


@pytest.fixture(scope="module")
def trained(cli_run) -> Path:
    return cli_run[0] / "model"


def test_validation_curve_is_printed_and_the_best_checkpoint_is_exported(cli_run):
    output, stdout = cli_run
    curve = {int(step): dict(zip(values.split()[::2], map(float, values.split()[1::2])))
             for step, values in re.findall(r"step (\d+) validation: (.*)", stdout)}
    assert sorted(curve) == [6, 12]  # every checkpoint_every steps and at the end
    for values in curve.values():
        assert {"loss", "lrap", "map", "macro_f1", "clips_lrap", "clips_map", "best"} <= set(values)
    best_step = max(curve, key=lambda step: (curve[step]["map"], -step))  # the first of equal scores is kept
    meta = json.loads((output / "model" / "finetune.json").read_text())
    assert meta["validation"]["step"] == best_step
    assert meta["validation"]["map"] == pytest.approx(curve[best_step]["map"], abs=1e-3)
    assert meta["validation"]["best"] == {"metric": "map", "value": meta["validation"]["map"], "step": best_step}
    assert meta["validation"]["precision"] == "fp32"  # validated at the precision it trained in (the recipe's)
    events = list((output / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and b"val/map" in b"".join(path.read_bytes() for path in events)


def test_thresholds_come_from_validation_mixtures(trained, data):
    model = load_model(trained, device="cpu")
    saved = json.loads((trained / "thresholds.json").read_text())
    assert list(saved) == list(INSTRUMENTS)
    meta = json.loads((trained / "finetune.json").read_text())
    recipe = FinetuneRecipe()
    recipe.data.val = str(data["val"])
    sets = validation_sets(recipe)
    assert len(sets["clips"]) == len(sets["mixtures"]) == meta["validation"]["count"] == 2 * len(INSTRUMENTS)
    sizes = [int(target.sum()) for target, _ in sets["mixtures"]]
    assert set(sizes) <= {1, 2, 3, 4} and max(sizes) >= 3 and np.mean(sizes) > 1.8  # polyphonic, like test files
    probabilities, targets = predict_set(model.classifier, model.info, sets["mixtures"], batch_size=16)
    np.testing.assert_allclose(list(saved.values()), tune_thresholds(probabilities, targets), atol=1e-4)
    assert not np.allclose(list(saved.values()), 0.5)
    clip_probabilities, clip_targets = predict_set(model.classifier, model.info, sets["clips"], batch_size=16)
    assert not np.allclose(tune_thresholds(clip_probabilities, clip_targets), list(saved.values()))


def test_thresholds_from_mixtures_and_files_are_tuned_on_both_pooled(data, backbone_dir, tmp_path):
    recipe = recipe_for(backbone_dir, data)
    recipe.eval.thresholds = ["mixtures", "files"]
    sets = validation_sets(recipe)
    assert len(sets["files"]) == len(sets["clips"]) // 2
    assert all(audio.shape[-1] >= 5 * RATE for _, audio in sets["files"])  # whole test-like files, many windows
    classifier = build_classifier(recipe)
    logged = exporter(recipe, tmp_path, resumed=False, sets=sets)(classifier, tmp_path, {"step": 1})
    meta = json.loads((tmp_path / "model" / "finetune.json").read_text())
    assert meta["validation"]["thresholds_from"] == "mixtures+files"
    assert meta["validation"]["count"] == len(sets["mixtures"]) + len(sets["files"])
    info = model_info(recipe)
    scored = {name: predict_set(classifier, info, sets[name], batch_size=16) for name in ("mixtures", "files")}
    pooled = [np.concatenate([scored[name][i] for name in scored]) for i in range(2)]
    thresholds = tune_thresholds(*pooled)
    np.testing.assert_allclose(meta["thresholds"], thresholds, atol=1e-6)
    assert not np.allclose(thresholds, tune_thresholds(*scored["mixtures"]))  # the files move them
    for prefix, (probabilities, targets) in [("", pooled), ("files_", scored["files"]),
                                             ("mixtures_", scored["mixtures"])]:
        metrics = multilabel_metrics(probabilities, targets, thresholds, list(INSTRUMENTS))
        assert logged[f"{prefix}map"] == pytest.approx(metrics["map"])
        assert logged[f"{prefix}macro_f1"] == pytest.approx(metrics["macro_f1"])


def test_unknown_threshold_sets_are_a_one_line_recipe_error(data, run_module, tmp_path):
    result = run_module("finetune", "recipes/finetune/cpu-synth.yaml", f"data.train={data['train']}",
                        f"data.val={data['val']}", f"output_dir={tmp_path}", "eval.thresholds=[mixtures, tests]")
    assert result.returncode != 0
    assert result.stderr.strip() == ("error: recipes/finetune/cpu-synth.yaml: 'eval.thresholds' must be one of "
                                     "mixtures, files, clips; got ['mixtures', 'tests']")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validation_scores_at_the_training_precision(precision, data, backbone_dir, tmp_path):
    recipe = recipe_for(backbone_dir, data)
    recipe.train.precision = precision
    sets = validation_sets(recipe)
    classifier = build_classifier(recipe)
    logged = exporter(recipe, tmp_path, resumed=False, sets=sets)(classifier, tmp_path, {"step": 1})
    meta = json.loads((tmp_path / "model" / "finetune.json").read_text())
    assert meta["validation"]["precision"] == precision
    probabilities, targets = predict_set(classifier, model_info(recipe), sets["mixtures"],
                                         batch_size=recipe.eval.batch_size, precision=precision)
    np.testing.assert_allclose(meta["thresholds"], tune_thresholds(probabilities, targets), atol=1e-6)
    assert logged["map"] == pytest.approx(multilabel_metrics(probabilities, targets, np.array(meta["thresholds"]),
                                                             list(INSTRUMENTS))["map"])


def test_transformers_pipeline_matches_timbre(trained, tmp_path):
    from transformers import pipeline

    config = json.loads((trained / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"]["0"] == INSTRUMENT_NAMES[INSTRUMENTS[0]]
    classify = pipeline("audio-classification", model=str(trained))
    audio = chord(("pia", "voi"), seconds=CLIP, seed=7)
    answer = classify({"raw": audio, "sampling_rate": RATE}, top_k=None)
    model = load_model(trained, device="cpu")
    ours, _ = model.classifier.predict(torch.from_numpy(audio)[None])
    expected = {INSTRUMENT_NAMES[code]: float(p) for code, p in zip(INSTRUMENTS, ours[0])}
    assert {item["label"] for item in answer} == set(expected)
    for item in answer:
        assert item["score"] == pytest.approx(expected[item["label"]], abs=1e-4)
    # The model card's own example runs as written, with no FFmpeg, on a 44.1 kHz stereo file.
    card = (trained / "README.md").read_text()
    metadata = ModelCard.load(trained / "README.md").data  # the Hub reads the card's YAML header
    assert (metadata.library_name, metadata.pipeline_tag) == ("transformers", "audio-classification")
    example = card.split("```python\n", 1)[1].split("```", 1)[0]
    sf.write(tmp_path / "clip.wav", np.stack([chord(("pia", "voi"), seconds=CLIP, rate=44100, seed=7)] * 2, axis=1), 44100)
    scope: dict = {}
    exec(example.replace("MODEL_DIR", str(trained)).replace("clip.wav", str(tmp_path / "clip.wav")), scope)
    from_card = {item["label"]: item["score"] for item in scope["answer"]}
    assert max(from_card, key=from_card.get) == max(expected, key=expected.get)


def test_evaluate_a_60s_file_equals_the_aggregate_of_its_windows(trained, tmp_path, capsys):
    from finetune.evaluate import main as evaluate_main

    folder = tmp_path / "IRMAS-TestingData-Part1" / "Part 1"
    folder.mkdir(parents=True)
    long = np.stack([chord(("cel", "pia"), seconds=60.0, rate=44100, seed=3)] * 2, axis=1)
    sf.write(folder / "Song, No. 1 - live-1.wav", long, 44100)
    (folder / "Song, No. 1 - live-1.txt").write_text("cel\t\npia  \n")
    sf.write(folder / "short-1.flac", chord(("vio",), seconds=1.0, rate=22050), 22050)
    (folder / "short-1.txt").write_text("vio\n")
    out = tmp_path / "report"
    assert evaluate_main([str(trained), str(tmp_path), "--out", str(out), "--hop-seconds", "2",
                          "--aggregate", "max"]) == 0
    assert "macro_f1" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == 2 and report["skipped"] == []
    for key in ("macro_f1", "micro_f1", "lrap", "hamming_score", "exact_match", "map", "per_instrument", "chunk"):
        assert key in report
    for plot in report["plots"]:
        assert (out / plot).stat().st_size > 0
    assert (out / "report.md").read_text().startswith("# Evaluation report")

    model = load_model(trained, device="cpu")
    audio = read_mono(folder / "Song, No. 1 - live-1.wav", RATE)
    windows, starts = cut_windows(audio, model.window, 2 * RATE)
    assert starts == window_starts(60 * RATE, RATE, 2 * RATE) and starts[-1] == 59 * RATE
    one_by_one = np.stack([model.classifier.predict(window[None])[0][0].numpy() for window in windows])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    long_file = next(p for p in predictions if p["file"].endswith("live-1.wav"))
    assert long_file["windows"] == len(starts) == 31
    np.testing.assert_allclose([long_file["probabilities"][code] for code in INSTRUMENTS], one_by_one.max(axis=0),
                               atol=1e-5)


def test_predict_survives_a_corrupt_file(trained, tmp_path, capsys):
    from finetune.predict import main as predict_main

    good = tmp_path / "good.wav"
    sf.write(good, chord(("sax",), seconds=7.3, rate=48000), 48000)
    short = tmp_path / "short.ogg"
    sf.write(short, np.stack([chord(("flu",), seconds=0.6, rate=8000)] * 3, axis=1), 8000, format="OGG")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    assert predict_main([str(trained), str(good), str(corrupt), str(short), "--timeline"]) == 1
    output = capsys.readouterr()
    assert "1 of 3 files could not be read" in output.err
    answers = [json.loads(line) for line in output.out.splitlines()]
    assert [a["file"] for a in answers] == [str(good), str(corrupt), str(short)]
    assert "error" in answers[1] and "probabilities" not in answers[1]
    for answer in (answers[0], answers[2]):
        assert set(answer["probabilities"]) == set(INSTRUMENTS)
        assert len(answer["timeline"]) == answer["windows"]
    assert answers[0]["windows"] == 14 and answers[2]["windows"] == 1  # 7.3 s: 0, 0.5, ..., 6, 6.3; 0.6 s: padded
    assert answers[0]["timeline"][-1] == {**answers[0]["timeline"][-1], "start": 6.3, "end": 7.3}


def test_calibrate_moves_thresholds_to_the_validation_shares_of_a_collection(trained, run_module, tmp_path):
    """Calibrated thresholds flag the same share of the collection's scores as the exported ones flagged on validation
    (per instrument, or of all scores pooled); only a copy of the model changes."""
    from finetune.calibrate import calibrate, collection_scores

    collection = tmp_path / "collection"
    collection.mkdir()
    for i in range(24):  # quieter two-instrument pieces than the training clips: another score scale
        codes = (INSTRUMENTS[i % 11], INSTRUMENTS[(i * 5 + 3) % 11])
        sf.write(collection / f"piece-{i:02d}.wav", 0.2 * chord(codes, seconds=2.5, seed=900 + i), RATE)
    validation = json.loads((trained / "finetune.json").read_text())["validation"]
    assert len(validation["positive_rates"]) == len(validation["pooled_rates"]) == len(INSTRUMENTS)
    result = run_module("finetune", "calibrate", str(trained), str(collection), "--out", str(tmp_path / "cal"),
                        "--match", "instrument")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "thresholds calibrated on 24 files (0 unreadable), match instrument" in result.stdout
    model = load_model(tmp_path / "cal", device="cpu")
    scores, failed = collection_scores(model, [str(collection)], aggregate=None, hop_seconds=None, batch_size=8,
                                       progress=False)
    assert scores.shape == (24, len(INSTRUMENTS)) and failed == 0
    flagged = (scores >= np.array(model.info.thresholds)).mean(axis=0)
    assert np.abs(flagged - validation["positive_rates"]).max() <= 1 / 24 + 1e-9
    assert model.info.calibration["files"] == 24 and model.info.calibration["match"] == "instrument"
    assert model.info.calibration["thresholds_before"] == load_model(trained, device="cpu").info.thresholds
    assert json.loads((tmp_path / "cal" / "thresholds.json").read_text()) == dict(zip(INSTRUMENTS, model.info.thresholds))
    record = calibrate(trained, [str(collection)], tmp_path / "pooled", progress=False)
    pooled = np.array(record["thresholds"])
    shares = [(scores >= t).mean() for t in pooled]
    assert np.abs(np.array(shares) - validation["pooled_rates"]).max() <= 1 / scores.size + 1e-9
    assert not np.allclose(pooled, model.info.thresholds)
    # user errors: one line each, and nothing written
    few = run_module("finetune", "calibrate", str(trained), *map(str, sorted(collection.iterdir())[:5]), "--out",
                     str(tmp_path / "few"))
    assert few.returncode == 2 and few.stderr.count("\n") == 1 and "5 readable files" in few.stderr
    assert not (tmp_path / "few").exists()
    again = run_module("finetune", "calibrate", str(trained), str(collection), "--out", str(tmp_path / "cal"))
    assert again.returncode == 2 and "exists; pass a new folder to --out" in again.stderr
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    meta = json.loads((old / "finetune.json").read_text())
    meta["validation"] = {}
    (old / "finetune.json").write_text(json.dumps(meta))
    stale = run_module("finetune", "calibrate", str(old), str(collection), "--out", str(tmp_path / "stale"))
    assert stale.returncode == 2 and stale.stderr.count("\n") == 1 and "records no validation rates" in stale.stderr


def test_init_from_continues_a_fine_tuned_model_with_its_head(trained, data, run_module, tmp_path):
    """init_from=MODEL starts a run from a fine-tuned model's backbone and head: before any step the classifier scores
    audio exactly as the saved model does, and the CLI run exports the head it was given (zero learning rate)."""
    recipe = recipe_for(trained / "backbone", data, head__kind="linear", head__pooling="cls")
    recipe.backbone, recipe.init_from = None, str(trained)
    audio = torch.from_numpy(np.stack([chord(("pia", "voi"), seconds=CLIP, seed=s) for s in range(2)]))
    with torch.no_grad():
        assert torch.allclose(build_classifier(recipe).eval()(audio), load_model(trained, device="cpu").classifier(audio),
                              atol=1e-5)
    common = [f"init_from={trained}", f"data.train={data['train']}", f"data.val={data['val']}", "data.shuffle_buffer=8",
              f"data.clip_seconds={CLIP}", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
              "train.checkpoint_every=2", "eval.mixtures=8", "eval.hop_seconds=0.5"]
    result = run_module("finetune", "recipes/finetune/lora.yaml", *common, "train.lr=0", "adapt.mode=full",
                        "adapt.warmup_head_steps=0", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(tmp_path / "run" / "model" / "head.safetensors")
    assert all(torch.equal(exported[name], value) for name, value in load_file(trained / "head.safetensors").items())
    other = run_module("finetune", "recipes/finetune/cpu-synth.yaml", *common, "model.frequency_stride=null",
                       f"output_dir={tmp_path / 'other'}")
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "Traceback" not in other.stderr
    assert f"init_from={trained} has another head; override head.pooling=cls to continue from it" in other.stderr
    both = run_module("finetune", "recipes/finetune/lora.yaml", *common, f"backbone={trained / 'backbone'}",
                      f"output_dir={tmp_path / 'both'}")
    assert both.returncode == 2 and "drop one of the two (override backbone=null)" in both.stderr


def test_bf16_inference_stays_close_to_fp32(trained, data, tmp_path):
    from finetune.evaluate import evaluate

    reports = {precision: evaluate(load_model(trained, device="cpu", precision=precision), str(data["val"]),
                                   out=tmp_path / precision) for precision in ("fp32", "bf16")}
    assert reports["bf16"]["precision"] == "bf16" and reports["bf16"]["files"] == reports["fp32"]["files"]
    lines = {precision: [json.loads(line) for line in (tmp_path / precision / "predictions.jsonl").read_text()
                         .splitlines()] for precision in reports}
    fp32, bf16 = ([[answer["probabilities"][code] for code in INSTRUMENTS] for answer in lines[p]]
                  for p in ("fp32", "bf16"))
    difference = np.abs(np.array(fp32) - np.array(bf16))
    assert 0 < difference.max() < 0.05  # autocast did run, and bf16 rounding moves the answers by little
    # auto: bf16 where this CPU multiplies it natively (as training's precision: auto), else fp32
    assert load_model(trained, device="cpu", precision="auto").precision == ("bf16" if cpu_has_bf16() else "fp32")
    failed = subprocess.run([sys.executable, "-m", "finetune", "predict", str(trained), "x.wav", "--precision", "fp16"],
                            cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].endswith("needs a CUDA GPU and this run is on cpu; use bf16 or fp32")


def test_evaluate_shards_and_embedding_map(trained, data, tmp_path):
    from finetune.evaluate import evaluate, plot_embeddings_main

    model = load_model(trained, device="cpu")
    report = evaluate(model, str(data["val"]), out=tmp_path / "report")
    assert report["files"] == report["windows"] / 5 == 2 * len(INSTRUMENTS)  # 3 s clips, 1 s windows every 0.5 s
    # the single validation clips, scored with the thresholds tuned on the validation mixtures
    assert report["macro_f1"] == pytest.approx(json.loads((trained / "finetune.json").read_text())
                                               ["validation"]["clips_macro_f1"], abs=1e-6)
    assert plot_embeddings_main([str(trained), str(data["val"]), "--out", str(tmp_path / "map.png"), "--method", "pca"]) == 0
    assert (tmp_path / "map.png").stat().st_size > 0


def test_several_models_evaluate_as_their_ensemble(trained, data, tmp_path):
    """`evaluate MODEL MODEL DATA --out DIR` averages the models' file probabilities (each after its own aggregate, the
    scale its thresholds were tuned on) and their thresholds; models that cut or decide files differently, or no
    --out, are one-line errors."""
    from finetune.evaluate import main as evaluate_main

    def variant(name: str, **changes) -> Path:
        folder = shutil.copytree(trained, tmp_path / name)
        info = json.loads((folder / "finetune.json").read_text())
        (folder / "finetune.json").write_text(json.dumps({**info, **changes}))
        return folder

    torch.manual_seed(1)
    other = variant("other", thresholds=[0.3] * len(INSTRUMENTS))
    head = load_file(other / "head.safetensors")
    save_file({name: value + 0.5 * torch.randn_like(value) for name, value in head.items()}, other / "head.safetensors")
    runs = {"one": [trained], "other": [other], "both": [trained, other], "both-max": [trained, other]}
    reports, probabilities = {}, {}
    for name, models in runs.items():
        aggregate = "max" if name == "both-max" else "mean"
        assert evaluate_main([*map(str, models), str(data["val"]), "--out", str(tmp_path / name),
                              "--aggregate", aggregate]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        probabilities[name] = np.array([[json.loads(line)["probabilities"][code] for code in INSTRUMENTS]
                                        for line in lines])
    assert reports["both"]["models"] == [str(trained), str(other)]
    assert reports["both"]["files"] == reports["one"]["files"] and reports["both"]["windows"] == reports["one"]["windows"]
    assert not np.allclose(probabilities["one"], probabilities["other"], atol=1e-3)
    np.testing.assert_allclose(probabilities["both"], (probabilities["one"] + probabilities["other"]) / 2, atol=1e-6)
    own_maxima = {name: evaluate_main([str(model), str(data["val"]), "--out", str(tmp_path / f"{name}-max"),
                                       "--aggregate", "max"]) for name, model in (("one", trained), ("other", other))}
    assert own_maxima == {"one": 0, "other": 0}
    maxima = [np.array([[json.loads(line)["probabilities"][code] for code in INSTRUMENTS] for line in
                        (tmp_path / f"{name}-max" / "predictions.jsonl").read_text().splitlines()]) for name in own_maxima]
    # the mean of the models' loudest windows, not the loudest window of their mean (lower, under the same thresholds)
    np.testing.assert_allclose(probabilities["both-max"], (maxima[0] + maxima[1]) / 2, atol=1e-6)
    thresholds = (np.array(json.loads((trained / "finetune.json").read_text())["thresholds"]) + 0.3) / 2
    assert [reports["both"]["per_instrument"][code]["threshold"] for code in INSTRUMENTS] == pytest.approx(thresholds)
    assert "Ensemble of 2 models" in (tmp_path / "both" / "report.md").read_text()

    longer = variant("longer", clip_seconds=2 * CLIP)
    with pytest.raises(UserError, match=rf"^{re.escape(str(longer))}: its clip length \(2.0\) differs from .*'s \(1.0\); "):
        evaluate_main([str(trained), str(longer), str(data["val"]), "--out", str(tmp_path / "x")])
    own = json.loads((trained / "finetune.json").read_text())["aggregate"]
    deciding = variant("deciding", aggregate="max" if own == "mean" else "mean")
    with pytest.raises(UserError, match="pass --aggregate mean or max$"):
        evaluate_main([str(trained), str(deciding), str(data["val"]), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="^an ensemble of 2 models has no folder of its own; pass --out REPORT_DIR$"):
        evaluate_main([str(trained), str(other), str(data["val"])])


def test_moving_average_of_the_weights_is_validated_exported_and_resumed(data, backbone_dir, tmp_path):
    """train.ema_decay: validation and the exported model use the moving average of the weights after each step
    (decay min(ema_decay, (1 + n) / (10 + n)) after n updates); checkpoints keep it, so a run resumed from one
    averages on as the unbroken run did, and resuming with another setting is a one-line error."""
    def recipe(output: Path, *, resume: Path | None = None, decay: float = 0.8) -> FinetuneRecipe:
        recipe = recipe_for(backbone_dir, data, head__kind="linear", data__shuffle_buffer=16, eval__mixtures=8,
                            train__steps=5, train__batch_size=4, train__warmup_steps=1, train__lr=3e-3,
                            train__checkpoint_every=1, train__keep_checkpoints=5, train__ema_decay=decay)
        recipe.output_dir, recipe.resume = str(output), resume and str(resume)
        return recipe

    run(recipe(tmp_path / "whole"))
    checkpoints = tmp_path / "whole" / "checkpoints"
    trained = [load_file(checkpoints / f"step-{step:06d}" / "model.safetensors") for step in range(1, 6)]
    expected = [trained[0]]  # the first update copies the weights
    for updates, weights in enumerate(trained[1:], start=1):
        weight = 1 - min(0.8, (1 + updates) / (10 + updates))
        expected.append({name: torch.lerp(expected[-1][name], weights[name], weight) for name in weights})
    kept = torch.load(checkpoints / "step-000005" / "custom_checkpoint_0.pkl", weights_only=True)
    assert int(kept["n_averaged"]) == 5
    for name, value in expected[-1].items():
        torch.testing.assert_close(kept[f"module.{name}"], value)
    assert not all(torch.equal(expected[-1][name], trained[-1][name]) for name in trained[-1])

    step = json.loads((tmp_path / "whole" / "model" / "finetune.json").read_text())["validation"]["step"]
    assert step > 1  # where the average and the weights differ
    exported = load_model(tmp_path / "whole" / "model", device="cpu").classifier.state_dict()
    for name, value in expected[step - 1].items():
        torch.testing.assert_close(exported[name], value)

    run(recipe(tmp_path / "resumed", resume=checkpoints / "step-000002"))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000005" / "custom_checkpoint_0.pkl",
                         weights_only=True)
    assert resumed.keys() == kept.keys() and all(torch.equal(resumed[name], kept[name]) for name in kept)
    with pytest.raises(UserError, match=r"step-000002: written with a moving average of the weights but "
                                        r"train.ema_decay=0.0; resume with the run's own train.ema_decay"):
        run(recipe(tmp_path / "plain", resume=checkpoints / "step-000002", decay=0.0))


@pytest.mark.slow
def test_two_process_ddp_run_with_adapters_head_warmup_and_a_moving_average(data, backbone_dir, tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", "-m", "finetune", "recipes/finetune/adapter.yaml",
         f"backbone={backbone_dir}", f"data.train={data['train']}", f"data.val={data['val']}",
         f"output_dir={tmp_path / 'run'}", f"data.clip_seconds={CLIP}", "data.shuffle_buffer=16", "train.steps=4",
         "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=2", "adapt.warmup_head_steps=2",
         "train.ema_decay=0.9"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model: ") == 1  # the main process reports once
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["finished"]
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "custom_checkpoint_0.pkl").is_file()  # the average
    model = load_model(tmp_path / "run" / "model", device="cpu")
    assert model.classifier.adapters is not None and not (tmp_path / "run" / "model" / "config.json").exists()


def test_yardsticks_score_the_regression_above_no_information(data, trained, write_shard, tmp_path, run_module):
    from finetune.evaluate import evaluate
    from finetune.yardsticks import NO_INFORMATION, REGRESSION, yardsticks

    scores = yardsticks(data["train"], data["val"], data["val"], clip_seconds=CLIP)
    assert scores[NO_INFORMATION]["macro_f1"] == pytest.approx(1 / 6)  # predicting all 11: precision 1/11, recall 1
    assert 0.2 < scores[NO_INFORMATION]["lrap"] < 0.4
    assert scores[REGRESSION]["lrap"] > scores[NO_INFORMATION]["lrap"] + 0.3  # the tones are easy for log-mel statistics
    evaluate(load_model(trained, device="cpu"), str(data["val"]), out=tmp_path / "report")
    result = run_module("finetune", "yardsticks", str(data["train"]), str(data["val"]), str(data["val"]),
                        "--clip-seconds", str(CLIP), "--report", str(tmp_path / "report" / "report.json"),
                        "--out", str(tmp_path / "y.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[1].startswith("model (") and lines[2].startswith(NO_INFORMATION) and lines[3].startswith(REGRESSION)
    assert json.loads((tmp_path / "y.json").read_text())[REGRESSION]["lrap"] == pytest.approx(scores[REGRESSION]["lrap"])

    # the regression aggregates windows as the model's report did: max here, which finds tones that fill one window
    brief = clips(tmp_path / "brief", [(code,) for code in INSTRUMENTS], seed=2000)
    for sample in brief:
        sample["audio"][round(0.8 * RATE):] *= 0.01
    brief = write_shard(tmp_path / "brief", brief)
    meaned, maxed = (yardsticks(data["train"], data["val"], brief, clip_seconds=CLIP, aggregate=how)[REGRESSION]
                     for how in ("mean", "max"))
    assert maxed != pytest.approx(meaned)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (tmp_path / "max.json").write_text(json.dumps({**report, "aggregate": "max"}))
    result = run_module("finetune", "yardsticks", str(data["train"]), str(data["val"]), str(brief),
                        "--clip-seconds", str(CLIP), "--report", str(tmp_path / "max.json"), "--out", str(tmp_path / "y.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "y.json").read_text())[REGRESSION] == pytest.approx(maxed)

    # and tunes its thresholds on the validation sets the model's were tuned on (its finetune.json), or on --thresholds
    mixtures, files = (yardsticks(data["train"], data["val"], data["val"], clip_seconds=CLIP, aggregate="max",
                                  thresholds=[name])[REGRESSION] for name in ("mixtures", "files"))
    assert files["macro_f1"] != pytest.approx(mixtures["macro_f1"])
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    meta = json.loads((model / "finetune.json").read_text())
    meta["validation"]["thresholds_from"] = "files"
    (model / "finetune.json").write_text(json.dumps(meta))
    (tmp_path / "files.json").write_text(json.dumps({**report, "aggregate": "max", "model": str(model)}))
    for flags in (["--report", str(tmp_path / "files.json")],
                  ["--report", str(tmp_path / "max.json"), "--thresholds", "files"]):
        result = run_module("finetune", "yardsticks", str(data["train"]), str(data["val"]), str(data["val"]),
                            "--clip-seconds", str(CLIP), *flags, "--out", str(tmp_path / "y.json"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp_path / "y.json").read_text())[REGRESSION] == pytest.approx(files)
