"""Pretraining objectives on the real frontend and backbone: structure of masks and corruptions, and learning."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pretrain.backbone import BackboneConfig, patchify
from pretrain.objectives import (
    ORIGINAL,
    REPLACED,
    SHUFFLED,
    ElectraConfig,
    MAEConfig,
    MetricConfig,
    ObjectivesConfig,
    Pretrainer,
    TeacherConfig,
    balanced_accuracy,
    block_scores,
    corrupt_patches,
    ema_decay,
    frequency_band_scores,
    hierarchical_triplets,
    hierarchy_levels,
    mask_from_scores,
    masked_patch_loss,
    normalise_patches,
    random_scores,
    time_band_scores,
)
from pretrain.pictures import pictures
from shards import vocab

GRID = (8, 6)  # 1 s clips: 8 frequency x 6 time patches
TINY = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_frames=98)


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's 2 cores are shared; one thread per test process is much faster than oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gliding_tones(count: int, seed: int, seconds: float = 1.0, sample_rate: int = 16000) -> torch.Tensor:
    """(count, samples) harmonic tones with a random pitch, timbre, glide and tremolo: structure to learn."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 110 * 2 ** (torch.rand(count, 1, 1, generator=g) * 3)
    harmonics = torch.arange(1, 25)[None, :, None]
    frequency = f0 * harmonics * (1 + 0.3 * t)
    amplitude = torch.rand(count, 24, 1, generator=g) / harmonics.sqrt() * (frequency < 8000)
    audio = (amplitude * torch.sin(2 * math.pi * frequency * t)).sum(1)
    tremolo = (1 + torch.sin(2 * math.pi * torch.rand(count, 1, generator=g) * 4 * t)) / 2
    return 0.1 * audio * tremolo + 0.001 * torch.randn(count, t.numel(), generator=g)


def pretrainer(**weights: float) -> Pretrainer:
    torch.manual_seed(0)
    mae = MAEConfig(weight=weights.get("mae", 0.0), decoder_hidden_size=64, decoder_layers=1, decoder_heads=4,
                    decoder_intermediate_size=128)
    teacher = TeacherConfig(weight=weights.get("teacher", 0.0), predictor_hidden_size=64, predictor_layers=1,
                            predictor_intermediate_size=128)
    return Pretrainer(backbone=TINY, objectives=ObjectivesConfig(
        mae=mae, teacher=teacher, electra=ElectraConfig(weight=weights.get("electra", 0.0)),
        metric=MetricConfig(weight=weights.get("metric", 0.0), projection_size=32)))


@pytest.fixture(scope="module")
def features() -> dict[str, torch.Tensor]:
    """Log-mel features of training and held-out tones, computed once (B, T, F)."""
    torch.set_num_threads(1)
    model = pretrainer(mae=1.0)
    with torch.no_grad():
        return {"train": model.features(gliding_tones(128, seed=0))[:, 0],
                "held_out": model.features(gliding_tones(32, seed=1))[:, 0]}


@pytest.mark.parametrize("scores", [random_scores, time_band_scores, frequency_band_scores, block_scores])
def test_masking_masks_the_asked_share_and_keeps_the_rest_in_token_order(scores):
    keep, masked = mask_from_scores(scores(4, GRID, torch.device("cpu")), 0.75)
    assert keep.shape == (4, 12) and masked.sum(1).tolist() == [36] * 4
    assert torch.equal(keep, keep.sort(1).values)
    assert not masked.gather(1, keep).any()


def test_band_and_block_masking_are_structured():
    torch.manual_seed(0)
    _, masked = mask_from_scores(time_band_scores(16, GRID, torch.device("cpu")), 0.5)  # 3 of 6 columns
    columns = masked.view(16, *GRID)
    assert (columns.all(dim=1) | ~columns.any(dim=1)).all()  # whole time columns, masked or not
    _, masked = mask_from_scores(frequency_band_scores(16, GRID, torch.device("cpu")), 0.5)  # 4 of 8 rows
    rows = masked.view(16, *GRID)
    assert (rows.all(dim=2) | ~rows.any(dim=2)).all()
    _, masked = mask_from_scores(block_scores(16, GRID, torch.device("cpu"), size=2), 0.5)  # 6 of 12 blocks
    blocks = masked.view(16, 4, 2, 3, 2)
    assert (blocks.all(dim=(2, 4)) | ~blocks.any(dim=(2, 4))).all()


def test_corruption_shuffles_within_the_clip_and_replaces_from_other_clips():
    torch.manual_seed(0)
    patches = torch.randn(4, 48, 256)
    corrupted, labels = corrupt_patches(patches, ratio=0.25, replace_fraction=0.5)
    assert (labels != ORIGINAL).sum(1).tolist() == [12] * 4
    assert (labels == SHUFFLED).sum(1).tolist() == [6] * 4
    assert torch.equal(corrupted[labels == ORIGINAL], patches[labels == ORIGINAL])
    for clip in range(4):
        own = patches[clip]
        for position in (labels[clip] != ORIGINAL).nonzero().flatten():
            patch = corrupted[clip, position]
            assert not torch.equal(patch, own[position])  # nothing stays where it was
            from_own = (own == patch).all(dim=1).any()
            others = torch.cat([patches[:clip], patches[clip + 1:]]).flatten(0, 1)
            from_other = (others == patch).all(dim=1).any()
            assert bool(from_own) == (labels[clip, position] == SHUFFLED)
            assert bool(from_other) == (labels[clip, position] == REPLACED)


def test_triplet_margins_grow_with_distance_in_the_label_hierarchy():
    codes = [vocab.INSTRUMENTS[0], vocab.INSTRUMENTS[9], vocab.INSTRUMENTS[6]]  # cello, violin (strings), piano
    same_family = vocab.FAMILY_OF[codes[0]] == vocab.FAMILY_OF[codes[1]] != vocab.FAMILY_OF[codes[2]]
    assert same_family
    clips = [[codes[0]], [codes[0], codes[2]], [codes[1]], [codes[2]]]  # multi-label clip 1 shares cello and piano
    targets = torch.from_numpy(np.stack([vocab.multi_hot(c) for c in clips]))
    families = torch.from_numpy(np.stack([vocab.family_multi_hot(c) for c in clips]))
    levels = hierarchy_levels(targets, families)
    assert levels[0].tolist() == [0, 0, 1, 2] and levels[1, 3] == 0
    genre = torch.tensor([0, 0, 0, 1])
    config = MetricConfig(family_margin=0.1, different_margin=0.3, genre_margin=0.05)
    a, p, n, margins = hierarchical_triplets(levels, genre, config=config)
    found = {(int(x), int(y), int(z)): round(float(m), 4) for x, y, z, m in zip(a, p, n, margins)}
    assert found[(0, 1, 2)] == 0.1  # positive shares the instrument, negative only the family
    assert found[(0, 1, 3)] == 0.35  # negative shares no family, and its genre differs
    assert found[(0, 2, 3)] == 0.25  # positive shares only the family: the gap between the two levels + genre
    assert (1, 0, 3) not in found  # clip 3 shares piano with clip 1: it is a positive there, never a negative
    assert all(levels[x, y] < levels[x, z] for x, y, z in found)


def metric_batch(clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """clips (16, T, F) -> two crops of each (16, 2, T, F) and labels: one instrument each, a quarter unlabelled."""
    labels = [[vocab.INSTRUMENTS[i % 11]] for i in range(16)]
    batch = {"targets": torch.from_numpy(np.stack([vocab.multi_hot(c) for c in labels])),
             "families": torch.from_numpy(np.stack([vocab.family_multi_hot(c) for c in labels])),
             "genre": torch.arange(16) % 5, "labelled": torch.arange(16) % 4 != 0}
    return torch.stack([clips, clips.roll(3, dims=1)], dim=1), batch


@pytest.mark.parametrize("objective", ["mae", "teacher", "electra", "metric"])
def test_each_objective_alone_lowers_its_loss_on_a_fixed_batch(objective, features):
    model = pretrainer(**{objective: 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch_features = features["train"][:16]
    views, batch = metric_batch(batch_features)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        if objective == "metric":
            terms = model.metric_terms(views, batch)
            loss = terms["ntxent"] + terms["triplet"]
        elif objective == "teacher":  # a fixed teacher (no EMA steps): the student learns to predict its tokens
            loss = model.teach(batch_features)["loss"]
        else:
            loss = getattr(model, objective)(batch_features)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, (objective, losses)


def test_metric_alone_trains_overlapping_patches_with_patchout_and_the_patchwise_objectives_refuse_them(features):
    overlapping = dataclasses.replace(TINY, frequency_stride=4)  # 29 x 6 patches of 1 s clips
    metric = MetricConfig(weight=1.0, projection_size=32, patchout=0.75)
    alone = ObjectivesConfig(mae=MAEConfig(weight=0.0), metric=metric)  # MAE's weight is 1 unless said
    torch.manual_seed(0)
    model = Pretrainer(backbone=overlapping, objectives=alone)
    tokens = []
    model.backbone.register_forward_hook(lambda module, args, kwargs, output: tokens.append(output.tokens.shape[1]),
                                         with_kwargs=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    views, batch = metric_batch(features["train"][:16])

    def evaluated() -> float:  # every patch, one SpecAugment draw
        model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            terms = model.metric_terms(views, batch)
        model.train()
        return float(terms["ntxent"] + terms["triplet"])

    before = evaluated()
    for step in range(30):
        torch.manual_seed(step)
        terms = model.metric_terms(views, batch)
        (terms["ntxent"] + terms["triplet"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert evaluated() < 0.9 * before
    assert tokens[1] == 29 * 6 - round(0.75 * 29 * 6) and tokens[0] == tokens[-1] == 29 * 6  # patchout in training only
    for name in ("teacher", "electra"):
        with pytest.raises(ValueError, match=f"objectives.{name} needs non-overlapping patches"):
            Pretrainer(backbone=overlapping, objectives=dataclasses.replace(
                alone, **{name: dataclasses.replace(getattr(alone, name), weight=1.0)}))
    with pytest.raises(ValueError, match="objectives.mae on patches overlapping in frequency needs whole time columns"):
        Pretrainer(backbone=overlapping, objectives=dataclasses.replace(alone, mae=MAEConfig(masking="random")))
    with pytest.raises(ValueError, match="metric.patchout"):
        MetricConfig(patchout=1.0)


def test_mae_on_patches_overlapping_in_frequency_hides_whole_time_columns_and_learns(features):
    overlapping = dataclasses.replace(TINY, frequency_stride=4)  # 29 x 6 patches of 1 s clips
    mae = MAEConfig(mask_ratio=0.6, masking="time", decoder_hidden_size=64, decoder_layers=1, decoder_heads=4,
                    decoder_intermediate_size=128)
    torch.manual_seed(0)
    model = Pretrainer(backbone=overlapping, objectives=ObjectivesConfig(mae=mae))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(150):
        model.mae(features["train"][(step % 8) * 16:][:16])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        seen = model.mae(features["train"])
        held = model.mae(features["held_out"])
    columns = held["masked"].view(-1, 29, 6)
    assert (columns.all(dim=1).sum(1) == round(0.6 * 6)).all() and (columns.all(dim=1) == columns.any(dim=1)).all()
    frames = 6 * 16  # each target is the token's own (overlapping) patch
    patches = torch.nn.functional.unfold(features["held_out"][:, :frames].transpose(1, 2)[:, None], 16, stride=(4, 16))
    torch.testing.assert_close(held["target"], normalise_patches(patches.transpose(1, 2)))
    mean_patch = seen["target"][seen["masked"]].mean(0)
    baseline = masked_patch_loss(mean_patch.expand_as(held["target"]), held["target"], held["masked"])
    assert held["loss"] < baseline - 0.02, (float(held["loss"]), float(baseline))
    drawn = pictures(model, {"audio": gliding_tones(2, seed=2)})
    assert drawn["mae/input-masked-reconstruction"].shape == (3 * 128 + 8, frames, 3)


def test_metric_views_are_resize_cropped_in_training_only_when_asked(features):
    views, batch = metric_batch(features["train"][:16])
    stacked = torch.cat([views[:, 0], views[:, 1]])  # what the backbone reads untouched: (views x clips, T, F)
    for resize_crop in (False, True):
        metric = MetricConfig(weight=1.0, projection_size=32, spec_augment=False, resize_crop=resize_crop)
        model = Pretrainer(backbone=TINY, objectives=ObjectivesConfig(mae=MAEConfig(weight=0.0), metric=metric))
        read = []
        model.backbone.register_forward_hook(lambda module, args, output: read.append(args[0]))
        with torch.no_grad():
            model.train().metric_terms(views, batch)
            model.eval().metric_terms(views, batch)
        assert torch.equal(read[1], stacked)
        assert torch.equal(read[0], stacked) is not resize_crop


def test_with_two_views_the_student_reads_the_first_and_the_teacher_the_last():
    model = pretrainer(teacher=1.0)
    audio = torch.stack([gliding_tones(4, seed=2), gliding_tones(4, seed=3)], dim=1)  # (clips, views, samples)
    with torch.no_grad():
        torch.manual_seed(0)
        _, logs = model({"audio": audio})
        views = model.features(audio)
        torch.manual_seed(0)
        crossed = model.teach(views[:, 0], views[:, 1])
        torch.manual_seed(0)
        same = model.teach(views[:, 0])
        tokens = model.teacher(views[:, 1]).tokens
    assert logs["teacher"] == crossed["loss"] != same["loss"]
    expected = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])[crossed["masked"]]
    torch.testing.assert_close(crossed["target"].flatten(0, 1), expected)


def trained(objective: str, train: torch.Tensor, *, steps: int) -> Pretrainer:
    """A pretrainer with only `objective`, trained for `steps` on rolling batches of 16 of `train`, in eval mode."""
    model = pretrainer(**{objective: 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        getattr(model, objective)(train[(step % 8) * 16:][:16])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_mae_reconstructs_held_out_masked_patches_better_than_the_mean_patch(features):
    model = trained("mae", features["train"], steps=150)
    torch.manual_seed(123)
    with torch.no_grad():
        seen = model.mae(features["train"])
        mean_patch = seen["target"][seen["masked"]].mean(0)  # the best constant prediction
        held = model.mae(features["held_out"])
    baseline = masked_patch_loss(mean_patch.expand_as(held["target"]), held["target"], held["masked"])
    assert held["loss"] < baseline - 0.02, (float(held["loss"]), float(baseline))


def test_electra_head_beats_chance_on_held_out_clips(features):
    model = trained("electra", features["train"], steps=200)
    torch.manual_seed(123)
    with torch.no_grad():
        held = model.electra(features["held_out"])
    accuracy = float(balanced_accuracy(held["logits"], held["labels"]))
    assert accuracy > 0.45, accuracy  # chance: 1/3 (original, shuffled, replaced)


def test_pretrainer_combines_weighted_objectives_and_draws_pictures():
    model = pretrainer(mae=1.0, electra=0.5, metric=0.25)
    audio = gliding_tones(4, seed=2)
    labels = [[vocab.INSTRUMENTS[i]] for i in range(4)]
    batch = {"audio": audio, "targets": torch.from_numpy(np.stack([vocab.multi_hot(c) for c in labels])),
             "families": torch.from_numpy(np.stack([vocab.family_multi_hot(c) for c in labels])),
             "genre": torch.tensor([0, 1, -1, 2]), "labelled": torch.tensor([True, True, True, False])}
    torch.manual_seed(0)
    loss, logs = model(batch)
    assert set(logs) >= {"mae", "electra", "metric", "metric_ntxent", "metric_triplet", "electra_balanced_accuracy"}
    expected = float(logs["mae"]) + 0.5 * float(logs["electra"]) + 0.25 * float(logs["metric"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused
    drawn = pictures(model, batch)
    frames = TINY.grid(98)[1] * 16
    for picture in drawn.values():
        assert picture.dtype.name == "uint8" and picture.shape == (3 * 128 + 8, frames, 3)
    assert set(drawn) == {"mae/input-masked-reconstruction", "electra/corrupted-truth-detected"}
    assert patchify(torch.zeros(1, frames, 128), 16).shape == (1, 48, 256)


def test_ema_teacher_moves_once_per_step_by_the_scheduled_share_and_never_trains():
    config = TeacherConfig(ema_decay=0.9, ema_decay_end=0.99)
    assert ema_decay(0.0, config) == pytest.approx(0.9) and ema_decay(1.0, config) == pytest.approx(0.99)
    assert ema_decay(0.5, config) == pytest.approx(0.945)  # cosine: half way at mid-run
    model = pretrainer(teacher=1.0)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not {id(p) for p in model.teacher.parameters()} & {id(p) for p in model.parameters() if p.requires_grad}
    with torch.no_grad():  # a student that has moved away from its initial copy
        for parameter in model.backbone.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    batch = {"audio": gliding_tones(4, seed=3)}
    loss, logs = model(batch, progress=0.0)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert logs["teacher_ema_decay"] == pytest.approx(0.99) and float(logs["teacher_target_std"]) > 0.1
    for old, new in zip(before, model.teacher.parameters()):  # 1% of the way to the student (student = old + 1)
        assert torch.allclose(new, old + 0.01, atol=1e-5)
    model(batch, progress=0.0)  # a second micro-batch of the same step (gradient accumulation): no second move
    model(batch)  # no progress given (pictures, evaluation): the teacher stays
    for old, new in zip(before, model.teacher.parameters()):
        assert torch.allclose(new, old + 0.01, atol=1e-5)
    model(batch, progress=0.5)  # decay 0.9945: 0.55% of the remaining 0.99
    for old, new in zip(before, model.teacher.parameters()):
        assert torch.allclose(new, old + 0.01 + 0.99 * 0.0055, atol=1e-5)
