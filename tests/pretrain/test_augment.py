"""Waveform augmentation: each lever does what it says on real audio, and off means off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.recipe import build
from finetune.train import FinetuneRecipe
from pretrain.augment import WaveAugment, WaveAugmentConfig
from pretrain.train import PretrainRecipe

RATE = 16000


def sines(batch: int = 8, freq: float = 440.0, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * RATE)) / RATE
    return (0.3 * torch.sin(2 * torch.pi * freq * t)).repeat(batch, 1)


def augment(**levers) -> WaveAugment:
    return WaveAugment(config=WaveAugmentConfig(**{"gain_db": 0.0, **levers}), sample_rate=RATE).train()


def peak_hz(audio: torch.Tensor) -> np.ndarray:
    spectrum = torch.fft.rfft(audio * torch.hann_window(audio.shape[-1])).abs()
    return spectrum.argmax(dim=-1).numpy() * RATE / audio.shape[-1]


def test_everything_off_is_the_identity_and_eval_never_augments():
    audio = sines()
    assert torch.equal(augment()(audio), audio)
    on = augment(gain_db=6.0, filters=1.0, noise=1.0, reverb=1.0, pitch=1.0)
    assert torch.equal(on.eval()(audio), audio)


def test_views_of_one_clip_are_augmented_each_on_its_own():
    torch.manual_seed(0)
    clips = torch.randn(16, RATE) * 0.1
    views = torch.stack([clips, clips], dim=1)  # (clips, views, samples): two copies of each clip
    out = augment(gain_db=6.0, noise=1.0)(views)
    assert out.shape == views.shape
    loudness = out.square().mean(-1)
    assert ((loudness[:, 0] / loudness[:, 1]).log10().abs() > 1e-3).all()  # each view got its own gain


def test_pretraining_augments_nothing_unless_the_recipe_says():
    assert torch.equal(WaveAugment(config=PretrainRecipe().augment, sample_rate=RATE).train()(sines()), sines())


def test_gain_scales_each_clip_within_its_range():
    torch.manual_seed(0)
    audio = sines(64)
    out = augment(gain_db=6.0)(audio)
    decibels = 20 * torch.log10(out.abs().amax(-1) / audio.abs().amax(-1))
    assert decibels.abs().max() <= 6.0 + 1e-4 and decibels.std() > 1.0


def test_noise_lands_within_its_snr_range():
    torch.manual_seed(0)
    audio = sines(32)
    out = augment(noise=1.0)(audio)
    snr = 10 * torch.log10(audio.square().mean(-1) / (out - audio).square().mean(-1))
    assert snr.min() >= 15.0 - 0.5 and snr.max() <= 40.0 + 0.5


def test_filters_change_the_spectrum_of_chosen_clips_only():
    torch.manual_seed(0)
    audio = torch.randn(64, RATE) * 0.1
    out = augment(filters=0.5)(audio)
    changed = ((out - audio).abs().amax(-1) > 1e-4).float().mean()
    assert 0.25 < changed < 0.75  # about half the clips are filtered
    spectra = torch.fft.rfft(out).abs().square()
    assert spectra[(out - audio).abs().amax(-1) > 1e-4].std(0).mean() > 0  # filtered clips differ in colour


def test_reverb_adds_a_decaying_tail_and_keeps_loudness():
    torch.manual_seed(0)
    click = torch.zeros(8, RATE)
    click[:, 100] = 1.0
    out = augment(reverb=1.0)(click)
    tail = out[:, 100 + RATE // 10 : 100 + RATE // 5].square().mean(-1)  # 100-200 ms after the click
    late = out[:, 100 + RATE // 2 :].square().mean(-1)
    assert (tail > 1e-8).all() and (late < tail).all()
    torch.testing.assert_close(out.square().mean(-1), click.square().mean(-1), rtol=1e-3, atol=1e-9)


def test_pitch_moves_the_whole_batch_together_within_two_semitones():
    torch.manual_seed(1)
    out = augment(pitch=1.0)(sines(4))
    peaks = peak_hz(out)
    assert np.ptp(peaks) == 0  # one shift per batch
    semitones = 12 * np.log2(peaks[0] / 440.0)
    assert 0.2 < abs(semitones) <= 2.0 + 0.2


@pytest.mark.parametrize("recipe", [FinetuneRecipe, PretrainRecipe])
@pytest.mark.parametrize("key, value", [("noise", 1.5), ("reverb", -0.1), ("gain_db", -3.0)])
def test_a_bad_lever_in_a_recipe_is_one_line(recipe, key, value):
    with pytest.raises(UserError, match=f"recipe.yaml: augment: {key}") as error:
        build(recipe, {"augment": {key: value}}, source="recipe.yaml")
    assert "\n" not in str(error.value)
